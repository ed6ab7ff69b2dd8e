-- Argo CD health of a virtfleet.io VMHost (written by the node's agent, never by users).
local hs = {}
local status = obj.status or {}
local ready = nil
for _, c in ipairs(status.conditions or {}) do
  if c.type == "Ready" then ready = c end
end
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the node's agent"
elseif ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Agent running"
else
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
end
return hs
