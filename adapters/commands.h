/* The xprec subcommands: each takes argv with argv[0] the subcommand name and returns an exit
 * status (0 ok, 1 failure, 2 usage error). */
#ifndef XP_COMMANDS_H
#define XP_COMMANDS_H

int xp_cmd_synth(int argc, char **argv);
int xp_cmd_inspect(int argc, char **argv);
int xp_cmd_quantize(int argc, char **argv);
int xp_cmd_dequantize(int argc, char **argv);
int xp_cmd_tokenize(int argc, char **argv);
int xp_cmd_extract(int argc, char **argv);
int xp_cmd_analyze(int argc, char **argv);

int xp_cmd_score(int argc, char **argv);

int xp_cmd_generate(int argc, char **argv);

int xp_cmd_bench(int argc, char **argv);

int xp_cmd_fidelity(int argc, char **argv);

int xp_cmd_keyhash(int argc, char **argv);

#endif
