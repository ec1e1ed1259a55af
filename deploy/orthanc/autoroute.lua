-- Orthanc auto-routing: send every instance Orthanc stores to the reliability monitor's DICOM node,
-- in addition to wherever the classifier already receives it. The monitor is declared in
-- orthanc.json as the DICOM modality "monitor" (see deploy/orthanc/orthanc.json).
--
-- Instances that Orthanc itself created through Lua are not forwarded again, so one stored
-- instance is sent once. A failed send (e.g. 0xA700 when the monitor's queue is full) is logged by
-- Orthanc and not retried here: the monitor samples the traffic, it is not the archive.
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin["RequestOrigin"] ~= "Lua" then
    SendToModality(instanceId, "monitor")
  end
end
