// The official openai npm package as a client of the gateway: chat with and without stream,
// completions, the model list, and a wrong key surfacing as the SDK's AuthenticationError.
// Prints one JSON object for the test to check. Env: XPREC_BASE, XPREC_KEY, XPREC_MODEL.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.NODE_PATH, "x.js"));
const OpenAI = require("openai").default ?? require("openai");

const base = process.env.XPREC_BASE, key = process.env.XPREC_KEY, model = process.env.XPREC_MODEL;
const client = new OpenAI({ baseURL: base, apiKey: key, maxRetries: 0 });
const messages = [{ role: "user", content: "Say something." }];
const out = {};

const chat = await client.chat.completions.create({ model, messages, max_tokens: 8, seed: 3,
                                                    temperature: 0.7 });
out.chat_text = chat.choices[0].message.content;

const stream = await client.chat.completions.create({ model, messages, max_tokens: 8, seed: 3,
                                                      temperature: 0.7, stream: true });
out.chat_stream_text = "";
for await (const chunk of stream) {
  out.chat_stream_text += chunk.choices[0]?.delta?.content ?? "";
}

const c = await client.completions.create({ model, prompt: "Once", max_tokens: 4 });
out.completion_text = c.choices[0].text;

out.models = [];
for await (const m of client.models.list()) out.models.push(m.id);

try {
  await new OpenAI({ baseURL: base, apiKey: "wrong", maxRetries: 0 }).models.list();
  out.auth_error = "none";
} catch (e) {
  out.auth_error = e.constructor.name;
  out.auth_status = e.status;
}

console.log(JSON.stringify(out));
