-- Run one Argo CD health script the way Argo CD does: the object as the global `obj`,
-- the script's returned table is the health. Usage: lua5.1 run_health.lua health.lua < obj.json
-- Prints the result as JSON ({"status": ..., "message": ...}).
local cjson = require("cjson")

-- Argo CD hands Lua a nil for a JSON null; lua-cjson gives a sentinel. Match Argo CD.
local function denull(value)
  if value == cjson.null then return nil end
  if type(value) == "table" then
    for k, v in pairs(value) do value[k] = denull(v) end
  end
  return value
end

obj = denull(cjson.decode(io.read("*a")))
local script = assert(loadfile(arg[1]))
local hs = script()
io.write(cjson.encode({ status = hs.status, message = hs.message }))
