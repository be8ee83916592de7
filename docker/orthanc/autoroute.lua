-- Auto-routing of the demo PACS (docker-compose.yml): forward every CT and MR image it receives to the
-- infergate node, and nothing else: the node's own results (SEG and SR) would bounce back and forth, and the
-- node's models take CT and MR (add 'CR', 'DX' to ROUTED_MODALITIES for the chest X-ray model).
--
-- NODE_MODALITY is the key of the node in DicomModalities (orthanc.json); NODE_AET is the AE title the node
-- calls with (INFERGATE_AE_TITLE). Orthanc (1.10 and later) names the calling AE of a C-STORE "RemoteAet" in
-- the origin table; anything the node itself stored is skipped, whatever its modality, so no result, report
-- or retrieved study can loop. Images arriving over DICOMweb or the REST API are routed like C-STOREd ones.
local NODE_MODALITY = 'infergate'
local NODE_AET = 'INFERGATE'
local ROUTED_MODALITIES = { CT = true, MR = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin['RequestOrigin'] == 'DicomProtocol' and origin['RemoteAet'] == NODE_AET then
    return
  end
  if not ROUTED_MODALITIES[tags['Modality']] then
    return
  end
  -- Orthanc groups consecutive sends into jobs and keeps the association open a few seconds for the next
  -- image (DicomAssociationCloseDelay), so a series does not cost one association per image.
  SendToModality(instanceId, NODE_MODALITY)
end
