-- Argo CD health of a virtfleet.io VMRestore (docs/gitops.md). Lua 5.1, no libraries.
local hs = {}
local status = obj.status or {}

local function condition(type)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type then return c end
  end
  return nil
end

local ready = condition("Ready")
local stalled = condition("Stalled")
if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Restored"
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed: " .. ((ready and ready.message) or status.error or "restore failed")
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = "Stalled: " .. (stalled.message or stalled.reason or "")
else
  hs.status = "Progressing"
  hs.message = "Restore " .. (status.phase or "Pending")
end
return hs
