-- Auto-routing of the demo PACS (docker-compose.yml): forward every image it receives to the infergate
-- node, but never the node's own results, or they would bounce back and forth.
--
-- NODE_MODALITY is the key of the node in DicomModalities (orthanc.json); NODE_AET is the AE title the node
-- calls with (INFERGATE_AE_TITLE). Orthanc names the calling AE "RemoteAet" in the origin table.
local NODE_MODALITY = 'infergate'
local NODE_AET = 'INFERGATE'

function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if modality == 'SEG' or modality == 'SR' then
    return
  end
  if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == NODE_AET then
    return
  end
  SendToModality(instanceId, NODE_MODALITY)
end
