-- Argo CD health of a virtfleet.io VMSnapshot (docs/gitops.md). Lua 5.1, no libraries.
local hs = {}
local status = obj.status or {}

local function condition(type)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type then return c end
  end
  return nil
end

local stalled = condition("Stalled")
if status.phase == "Failed" then
  hs.status = "Degraded"
  if status.error ~= nil and status.error.message ~= nil then
    hs.message = "Failed: " .. status.error.message
  else
    hs.message = "Failed"
  end
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = "Stalled: " .. (stalled.message or stalled.reason or "")
elseif status.phase == "Ready" or status.readyToUse == true then
  hs.status = "Healthy"
  if status.memoryIncluded == true then
    hs.message = "Ready to use (disks and memory)"
  else
    hs.message = "Ready to use (disks)"
  end
else
  hs.status = "Progressing"
  hs.message = "Snapshot " .. (status.phase or "Pending")
end
return hs
