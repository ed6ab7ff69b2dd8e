-- Argo CD health of a virtfleet.io VMNetwork (docs/gitops.md). Lua 5.1, no libraries.
-- The controller writes status.observedGeneration with its conditions: Ready (VNI
-- assigned), Stalled (a VNI conflict, a spec that cannot work), Reconciling (deleted
-- while VMs still name it).
local hs = {}
local status = obj.status or {}

local function condition(type)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type then return c end
  end
  return nil
end

local function said(c)
  if c.message ~= nil and c.message ~= "" then return c.message end
  return c.reason or ""
end

local generation = obj.metadata and obj.metadata.generation
local ready = condition("Ready")
local stalled = condition("Stalled")
local observed = status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe generation " .. generation
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = "Stalled: " .. said(stalled)
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = said(ready)
  local count = status.allocatedCount
  if count == 1 then
    hs.message = hs.message .. ", 1 address in use"
  elseif count ~= nil and count > 0 then
    hs.message = hs.message .. ", " .. count .. " addresses in use"
  end
elseif ready ~= nil then
  hs.status = "Progressing"
  hs.message = said(ready)
else
  hs.status = "Progressing"
  hs.message = "Waiting for the controller"
end
return hs
