/* Which backends this build has: the CUDA one only when engine/cuda/ is compiled in
 * (make CUDA=1 defines XP_HAVE_CUDA and links it). */
#include "backend.h"

#ifdef XP_HAVE_CUDA
const xp_backend *xp_backend_cuda_impl(void);

const xp_backend *xp_backend_cuda(void)
{
    return xp_backend_cuda_impl();
}
#else
const xp_backend *xp_backend_cuda(void)
{
    return NULL;
}
#endif
