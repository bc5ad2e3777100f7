/* xprec keyhash: the SHA-256 of an API key read on stdin, as nginx.conf's key_sha256= and
 * xprec_admin_key_sha256 want it. The key never appears on a command line (where ps and shell
 * history would keep it); a trailing newline is not part of it. */
#include "cli.h"
#include "commands.h"

#include <openssl/evp.h>
#include <stdio.h>

int xp_cmd_keyhash(int argc, char **argv)
{
    xp_opt opts[] = {XP_OPT_END};
    const xp_cmd cmd = {.name = "keyhash",
                        .usage = "usage: printf %s KEY | xprec keyhash\n",
                        .about = "Prints the SHA-256 (hex) of the key read on stdin, for\n"
                                 "xprec_tenant's key_sha256= and xprec_admin_key_sha256. A\n"
                                 "final newline is dropped.\n",
                        .opts = opts};
    int rc = xp_cmd_parse(&cmd, argc, argv);
    if (rc >= 0) return rc;
    unsigned char key[4096], md[EVP_MAX_MD_SIZE];
    size_t n = fread(key, 1, sizeof key, stdin);
    if (!feof(stdin)) {
        fprintf(stderr, "xprec keyhash: the key is longer than %zu bytes\n", sizeof key - 1);
        return 1;
    }
    while (n && (key[n - 1] == '\n' || key[n - 1] == '\r'))
        n--;
    if (n == 0) {
        fprintf(stderr, "xprec keyhash: no key on stdin\n");
        return 1;
    }
    unsigned int len = 0;
    if (!EVP_Digest(key, n, md, &len, EVP_sha256(), NULL)) {
        fprintf(stderr, "xprec keyhash: SHA-256 failed\n");
        return 1;
    }
    for (unsigned i = 0; i < len; i++)
        printf("%02x", md[i]);
    printf("\n");
    return 0;
}
