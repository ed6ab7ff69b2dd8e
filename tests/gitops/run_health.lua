-- Run one Argo CD health script the way Argo CD does: the object as the global `obj`,
-- the script's returned table is the health. Usage: lua5.1 run_health.lua health.lua < obj.json
-- Prints the result as JSON ({"status": ..., "message": ...}).
local cjson = require("cjson")
local write, stdin = io.write, io.read

-- Argo CD hands Lua a nil for a JSON null; lua-cjson gives a sentinel. Match Argo CD.
local function denull(value)
  if value == cjson.null then return nil end
  if type(value) == "table" then
    for k, v in pairs(value) do value[k] = denull(v) end
  end
  return value
end

-- Argo CD runs a script from argocd-cm with the base and table libraries and a safe os
-- (time, date) only, unless resource.customizations.useOpenLibs is set (virtfleet does not
-- set it): no string, math or io, and strings have no methods. Match Argo CD.
local ARGO_CD_BASE = {
  "assert", "error", "getmetatable", "ipairs", "next", "pairs", "pcall", "rawequal",
  "rawget", "rawset", "select", "setmetatable", "tonumber", "tostring", "type", "unpack",
  "xpcall", "_VERSION",
}
local env = { table = table, os = { time = os.time, date = os.date } }
for _, name in ipairs(ARGO_CD_BASE) do env[name] = _G[name] end
env._G = env

local input = stdin("*a")
getmetatable("").__index = nil
env.obj = denull(cjson.decode(input))
local script = assert(loadfile(arg[1]))
setfenv(script, env)
local hs = script()
write(cjson.encode({ status = hs.status, message = hs.message }))
