"""Writes an xprec BF16 Qwen3 checkpoint (e.g. bench's `small`, Qwen3-0.6B's shape with random
weights) as an F16 GGUF file for llama.cpp, so both engines run the same weights: the tensors
under llama.cpp's qwen3 names, the hyperparameters, and the Qwen tokenizer from tokenizer.json.
Only for benchmarks (bench/llama.sh); llama.cpp's own gguf-py package does the file format.

usage: /usr/bin/python3 bench/llama_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf
       /usr/bin/python3 bench/llama_gguf.py LLAMA_CPP_DIR MODEL_DIR OUT.gguf --lora RANK
The second form writes a random rank-RANK LoRA adapter on all seven linear modules of every
layer instead (as xprec bench's --adapters makes them), for llama.cpp's --lora.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "ref"))
import st_numpy as st  # noqa: E402


MODULES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


def lora(gguf, cfg, out, rank):
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"attn_q": (q, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, q),
              "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i)}
    w = gguf.GGUFWriter(out, "qwen3")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank))
    rng = np.random.default_rng(0)
    for layer in range(cfg["num_hidden_layers"]):
        for g in MODULES.values():
            o, n = shapes[g]
            base = f"blk.{layer}.{g}.weight"
            w.add_tensor(base + ".lora_a", (0.01 * rng.standard_normal((rank, n))).astype(np.float16))
            w.add_tensor(base + ".lora_b", (0.01 * rng.standard_normal((o, rank))).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(llama_dir, model_dir, out, *rest):
    sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
    import gguf

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    if rest:
        assert rest[0] == "--lora" and len(rest) == 2, __doc__
        return lora(gguf, cfg, out, int(rest[1]))
    assert not cfg.get("quantization_config"), "needs the BF16 checkpoint"
    n_layers = cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(out, "qwen3")
    w.add_name("xprec-bench")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)

    tok = json.load(open(os.path.join(model_dir, "tokenizer.json")))
    vocab = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [gguf.TokenType.UNUSED] * vocab
    for t, i in tok["model"]["vocab"].items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for a in tok["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(151643)
    w.add_eos_token_id(151645)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, n_layers)
    tensors = st.read_dir(model_dir)
    for name, t in tensors.items():
        gname = names.get_name(name, try_suffixes=(".weight",))
        assert gname, f"no llama.cpp name for {name}"
        a = t.array()
        # llama.cpp keeps norms in F32 and matrices in F16
        w.add_tensor(gname, a.astype(np.float32 if a.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
