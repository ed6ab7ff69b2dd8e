-- Argo CD health of a virtfleet.io VMBackupSchedule (docs/gitops.md). Lua 5.1, no libraries.
-- A generation check applies only once an observed generation is written (kstatus's rule).
-- The controller writes status.observedGeneration with each plan; a schedule it cannot use
-- is Stalled (InvalidSchedule) and stamped with the generation on its conditions only.
local hs = {}
local status = obj.status or {}

local function condition(type)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type then return c end
  end
  return nil
end

-- A condition's message, or its reason when it has none.
local function said(c)
  if c.message ~= nil and c.message ~= "" then return c.message end
  return c.reason or ""
end

-- "; 2 runs missed" (missedRuns counts the runs missed since the schedule was created).
local function missed()
  local runs = status.missedRuns
  if runs == nil or runs == 0 then return "" end
  if runs == 1 then return "; 1 run missed" end
  return "; " .. runs .. " runs missed"
end

local generation = obj.metadata and obj.metadata.generation
local ready = condition("Ready")
local stalled = condition("Stalled")
local observed = status.observedGeneration
if ready ~= nil and ready.observedGeneration ~= nil and (observed == nil or ready.observedGeneration > observed) then
  observed = ready.observedGeneration
end
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe generation " .. generation
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = "Stalled: " .. said(stalled)
elseif ready ~= nil and ready.status == "True" then
  if ready.reason == "Suspended" then
    hs.status = "Suspended"
  else
    hs.status = "Healthy"
  end
  hs.message = said(ready) .. missed()
elseif ready ~= nil then
  hs.status = "Progressing"
  hs.message = said(ready)
elseif generation ~= nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe generation " .. generation
else
  hs.status = "Progressing"
  hs.message = "Waiting for the controller"
end
return hs
