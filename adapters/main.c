/* xprec: the offline cross-precision toolkit and the engine's command line. */
#include "commands.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    int (*run)(int, char **);
    const char *help;
} xp_commands[] = {
    {"synth", xp_cmd_synth, "write a random Qwen3-shaped checkpoint or a planted fine-tune"},
    {"inspect", xp_cmd_inspect, "tensor table, detected format and per-tensor statistics"},
    {"quantize", xp_cmd_quantize, "BF16 checkpoint -> FP8 block-quantized checkpoint"},
    {"fidelity", xp_cmd_fidelity, "how much of a fine-tune survives on FP8, method by method"},
    {"generate", xp_cmd_generate, "stream a reply from the engine (base or an adapter)"},
    {"bench", xp_cmd_bench, "prefill/decode throughput and memory bandwidth share"},
    {"score", xp_cmd_score, "logits of every position as a float32 .npy (parity checks)"},
    {"dequantize", xp_cmd_dequantize, "FP8 checkpoint -> BF16 checkpoint"},
    {"tokenize", xp_cmd_tokenize, "token ids of a text or chat with the model's tokenizer"},
    {"extract", xp_cmd_extract, "LoRA adapter from a fine-tune minus its base (Methods A and B)"},
    {"analyze", xp_cmd_analyze, "geometry of an adapter against the FP8 quantization noise"},
    {"keyhash", xp_cmd_keyhash, "SHA-256 of an API key read on stdin, for nginx.conf"},
};

static void xp_usage(FILE *fp)
{
    fprintf(fp, "usage: xprec COMMAND [options]   (xprec COMMAND --help for its options)\n\n");
    for (size_t i = 0; i < sizeof xp_commands / sizeof xp_commands[0]; i++)
        fprintf(fp, "  %-12s %s\n", xp_commands[i].name, xp_commands[i].help);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        xp_usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        xp_usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof xp_commands / sizeof xp_commands[0]; i++)
        if (strcmp(argv[1], xp_commands[i].name) == 0) return xp_commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "xprec: unknown command \"%s\"\n\n", argv[1]);
    xp_usage(stderr);
    return 2;
}
