// DATEncoder in the ComfyUI editor (served from WEB_DIRECTORY, see __init__.py): two extensions.
//
// After Save Concept or Export writes a new file, reload the node definitions (what pressing R does), so
// Load Concept, LoraLoader and the missing-model check know the new file without a manual refresh.
// The server finds the file by itself: folder_paths re-lists a folder whose modification time changed.
// The nodes' structured ui output (nodes.py's `shown`: output.datencoder = [{files, saved}]) says whether
// a file was written; the text beside it is for people and may change.
import { api } from "../../scripts/api.js";
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

// A refusal at queue time (a node's validate_inputs) reaches the editor as one error per input the check
// read (ComfyUI's execution.validate_inputs), so Apply Concept Token's "no placeholder" came twice, once for
// `text` and once for `placeholder`, behind a generic "Invalid input" toast. Keep each reason once per node
// and show it in a toast of its own, so the fix is readable without opening the error panel.
function reportRefusalsOnce(nodeErrors) {
  const reasons = [];
  for (const entry of Object.values(nodeErrors ?? {})) {
    if (!entry?.class_type?.startsWith("DATEncoder")) continue;
    const seen = new Set();
    entry.errors = entry.errors.filter((error) => {
      if (error.type !== "custom_validation_failed") return true;
      const reason = error.details.split(" - ").slice(1).join(" - ") || error.details;
      if (seen.has(reason)) return false;
      seen.add(reason);
      reasons.push(reason);
      return true;
    });
  }
  return reasons;
}

function toastRefusals(nodeErrors) {
  for (const reason of reportRefusalsOnce(nodeErrors)) {
    app.extensionManager?.toast?.add({ severity: "error", summary: "DATEncoder: refused", detail: reason, life: 15000 });
  }
}

// The refusals come back in the /prompt answer: with the prompt when other outputs still run (HTTP 200), or in
// the error when nothing can run (HTTP 400).
app.registerExtension({
  name: "DATEncoder.RefusalsOnce",
  async setup() {
    const queuePrompt = api.queuePrompt;
    api.queuePrompt = async function (...args) {
      let answer;
      try {
        answer = await queuePrompt.apply(this, args);
      } catch (error) {
        toastRefusals(error?.response?.node_errors);
        throw error;
      }
      toastRefusals(answer?.node_errors);
      return answer;
    };
  },
});
