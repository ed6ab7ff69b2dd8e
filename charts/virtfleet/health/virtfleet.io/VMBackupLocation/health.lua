-- Argo CD health of a virtfleet.io VMBackupLocation (docs/gitops.md). Lua 5.1, no libraries.
-- The controller checks the bucket and writes phase and observedGeneration together.
local hs = {}
local status = obj.status or {}
local spec = obj.spec or {}

local generation = obj.metadata and obj.metadata.generation
if status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to check the bucket"
elseif generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to check generation " .. generation
elseif status.phase == "Available" then
  hs.status = "Healthy"
  hs.message = "Available"
  if spec.bucket ~= nil then hs.message = hs.message .. ": bucket " .. spec.bucket end
  if status.backupCount == 1 then
    hs.message = hs.message .. " (1 backup)"
  elseif status.backupCount ~= nil then
    hs.message = hs.message .. " (" .. status.backupCount .. " backups)"
  end
elseif status.phase == "Unavailable" then
  hs.status = "Degraded"
  hs.message = "Unavailable: " .. (status.message or "the bucket cannot be reached")
else
  hs.status = "Progressing"
  hs.message = status.phase
end
return hs
