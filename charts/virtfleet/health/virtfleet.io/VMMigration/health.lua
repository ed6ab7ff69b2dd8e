-- Argo CD health of a virtfleet.io VMMigration (docs/gitops.md). Lua 5.1, no libraries.
-- Cancelled is Degraded: a VMMigration is one-shot, so the move it declares will not
-- happen unless someone acts (Suspended would suggest it resumes by itself).
local hs = {}
local status = obj.status or {}
local phase = status.phase or "Pending"

local function target()
  if status.targetNode ~= nil then return " to " .. status.targetNode end
  return ""
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Migrated" .. target()
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed: " .. (status.failureReason or "migration failed")
elseif phase == "Cancelled" then
  hs.status = "Degraded"
  hs.message = "Cancelled: " .. (status.failureReason or "the VM stays on " .. (status.sourceNode or "its node"))
else
  hs.status = "Progressing"
  hs.message = phase .. target()
  if status.progress ~= nil and status.progress.percent ~= nil then
    hs.message = hs.message .. " (" .. status.progress.percent .. "%)"
  end
end
return hs
