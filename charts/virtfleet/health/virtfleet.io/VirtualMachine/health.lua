-- Argo CD health of a virtfleet.io VirtualMachine (docs/gitops.md). Lua 5.1, no libraries.
-- A VM stopped on purpose (runStrategy Halted/Manual) is Ready=True, hence Healthy.
local hs = {}

local function condition(status, type)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type then return c end
  end
  return nil
end

local function describe(c, fallback)
  if c == nil then return fallback end
  if c.message ~= nil and c.message ~= "" then return c.reason .. ": " .. c.message end
  return c.reason or fallback
end

local status = obj.status
if status == nil or status.printableStatus == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for virtfleet to place and observe the VM"
  return hs
end

local ps = status.printableStatus
local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")
local reconciling = condition(status, "Reconciling")

-- The node's agent stopped reporting: nobody can tell what the VM does.
if ps == "Unknown" then
  hs.status = "Unknown"
  hs.message = describe(ready, "The VM's node does not report")
  return hs
end

-- kstatus: a status computed for an older spec says nothing about the current one.
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the agent to observe generation " .. generation
  return hs
end

if ps == "CrashLoopBackOff" or ps == "Failed" then
  hs.status = "Degraded"
  hs.message = ps .. ": " .. describe(ready, "the guest keeps stopping")
  return hs
end

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = "Stalled: " .. describe(stalled, "cannot make progress")
  return hs
end

if ps == "Scheduling" or ps == "Starting" or ps == "Stopping" or ps == "Migrating" or ps == "Terminating" then
  hs.status = "Progressing"
  hs.message = ps .. ": " .. describe(reconciling or ready, "in progress")
  return hs
end

if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = "Reconciling: " .. describe(reconciling, "in progress")
  return hs
end

if ps == "Paused" then
  hs.status = "Suspended"
  hs.message = "Paused: " .. describe(condition(status, "Paused"), "the guest's CPUs are paused")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  if status.nodeName ~= nil then
    hs.message = ps .. " on " .. status.nodeName
  else
    hs.message = ps
  end
  return hs
end

hs.status = "Progressing"
hs.message = ps .. ": " .. describe(ready, "waiting for Ready")
return hs
