// DATEncoder in the ComfyUI editor (served from WEB_DIRECTORY, see __init__.py).
// After Save Concept or Export writes a new file, reload the node definitions (what pressing R does), so
// Load Concept, LoraLoader and the missing-model check know the new file without a manual refresh.
// The server finds the file by itself: folder_paths re-lists a folder whose modification time changed.
// The nodes' structured ui output (nodes.py's `shown`: output.datencoder = [{files, saved}]) says whether
// a file was written; the text beside it is for people and may change.
import { app } from "../../scripts/app.js";

const WRITERS = new Set(["DATEncoderSaveConcept", "DATEncoderExportConcept"]);
// Files this page already refreshed for: an unchanged re-run answered from ComfyUI's cache replays the
// node's first ui output (saved: true), which writes nothing new.
const known = new Set();

app.registerExtension({
  name: "DATEncoder.RefreshAfterSave",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!WRITERS.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const written = (output?.datencoder ?? []).filter((record) => record.saved).flatMap((record) => record.files);
      const added = written.filter((file) => !known.has(file));
      added.forEach((file) => known.add(file));
      if (added.length) app.refreshComboInNodes();
    };
  },
});
