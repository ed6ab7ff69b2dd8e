-- Argo CD health of a virtfleet.io VMBackup (docs/gitops.md). Lua 5.1, no libraries.
-- A generation check applies only once status.observedGeneration is written (kstatus's
-- rule): the spec is immutable, so it cannot move past a status the agent wrote.
local hs = {}
local status = obj.status or {}

local function condition(type)
  if status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == type then return c end
  end
  return nil
end

-- 21474836480 -> "20.0 GiB" (no string or math library: Argo CD opens neither).
local function size(bytes)
  if bytes < 1024 then return bytes .. " B" end
  local units = { "KiB", "MiB", "GiB", "TiB", "PiB" }
  local value, unit = bytes / 1024, 1
  local tenths = value * 10 + 0.5
  tenths = tenths - tenths % 1
  while tenths >= 10240 and unit < #units do
    value, unit = value / 1024, unit + 1
    tenths = value * 10 + 0.5
    tenths = tenths - tenths % 1
  end
  return (tenths - tenths % 10) / 10 .. "." .. tenths % 10 .. " " .. units[unit]
end

local generation = obj.metadata and obj.metadata.generation
local stalled = condition("Stalled")
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the agent to observe generation " .. generation
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  if status.error ~= nil and status.error.message ~= nil then
    hs.message = "Failed: " .. status.error.message
  else
    hs.message = "Failed"
  end
elseif stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = "Stalled: " .. (stalled.message or stalled.reason or "")
elseif status.phase == "Completed" then
  hs.status = "Healthy"
  if status.type ~= nil then
    hs.message = status.type .. " backup completed"
  else
    hs.message = "Backup completed"
  end
  if status.sizeBytes ~= nil then
    hs.message = hs.message .. " (" .. size(status.sizeBytes) .. ")"
  end
else
  hs.status = "Progressing"
  hs.message = "Backup " .. (status.phase or "Pending")
  if status.progress ~= nil and status.progress.percent ~= nil then
    hs.message = hs.message .. " (" .. status.progress.percent .. "%)"
  end
end
return hs
