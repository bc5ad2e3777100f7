# The CUDA backend (engine/cuda/), included at the end of the Makefile.
#
#   make CUDA=1             build/bin/xprec and libxprec.a with the CUDA backend (sm_90a) linked in
#   make gpu-tests          the GPU test programs in build/gpu/ (implies CUDA=1)
#   make gpu-bundle         build/gpu-bundle/: binaries, the shared libraries they need and the
#                           scripts, to copy to a GPU machine that has only the NVIDIA driver
#   make cuda-compile       compile engine/cuda/ only (no GPU needed; `make check` does this
#                           whenever nvcc is found, so CI checks that the CUDA code builds)
#
# CUDA defaults to 0: a plain `make` never needs nvcc. Nothing here runs a GPU.

CUDA      ?= 0
# the toolkit holding the nvcc on PATH, else /usr/local/cuda
CUDA_HOME ?= $(or $(patsubst %/bin/nvcc,%,$(shell command -v nvcc 2>/dev/null)),/usr/local/cuda)
NVCC      ?= $(CUDA_HOME)/bin/nvcc
CUDA_ARCH ?= sm_90a
HAVE_NVCC := $(shell [ -x "$(NVCC)" ] && echo 1)

CUDA_CU_SRC := $(sort $(wildcard engine/cuda/*.cu))
CUDA_C_SRC  := $(sort $(wildcard engine/cuda/*.c))
CUDA_OBJS   := $(patsubst %.cu,$(BUILD)/cuda/obj/%.o,$(CUDA_CU_SRC)) \
               $(patsubst %.c,$(BUILD)/cuda/obj/%.o,$(CUDA_C_SRC))
# cudart static (the bundle then only needs libcublasLt beside the driver's libcuda)
CUDA_LIBS   := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcublasLt -lcudart_static \
               -ldl -lrt -lstdc++
NVCCFLAGS   ?= -O3
NVCCFLAGS   += -arch=$(CUDA_ARCH) -std=c++17 -Iengine -Xcompiler -Wall,-Wextra,-fno-strict-aliasing \
               -Werror all-warnings
CUDA_CFLAGS := -isystem $(CUDA_HOME)/include

$(BUILD)/cuda/obj/%.o: %.cu engine/cuda/xpc_kernels.h engine/util/xp_error.h
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

$(BUILD)/cuda/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(CUDA_CFLAGS) -c $< -o $@

.PHONY: cuda-compile cuda-clean gpu-tests gpu-test-bins gpu-bundle
cuda-compile: $(CUDA_OBJS)

clean: cuda-clean
cuda-clean:
	rm -rf $(BUILD)/cuda $(BUILD)/gpu $(BUILD)/gpu-bundle $(BUILD)/obj/tests/gpu

# backend.c is the one engine file that changes with CUDA; a stamp holding the setting
# rebuilds it (and so the library) whenever CUDA flips
CUDA_STAMP := $(BUILD)/cuda.setting
$(shell mkdir -p $(BUILD); [ "`cat $(CUDA_STAMP) 2>/dev/null`" = "$(CUDA)" ] || echo "$(CUDA)" >$(CUDA_STAMP))
$(BUILD)/obj/engine/backend.o: $(CUDA_STAMP)

ifeq ($(CUDA),1)
ifneq ($(HAVE_NVCC),1)
$(error CUDA=1 but $(NVCC) was not found; set CUDA_HOME or NVCC)
endif
$(BUILD)/obj/engine/backend.o: CFLAGS += -DXP_HAVE_CUDA
# the CUDA objects join the engine library; whatever links it links the CUDA libraries
$(LIB): $(CUDA_OBJS)
$(XPREC): LDLIBS += $(CUDA_LIBS)
$(BUILD)/tests/%: LDLIBS += $(CUDA_LIBS)
else ifeq ($(HAVE_NVCC),1)
# CI has nvcc but no GPU: prove the CUDA code compiles, run nothing of it
check: cuda-compile
endif

# ---------------------------------------------------------------- GPU tests and bundle

GPU_TEST_SRC := $(sort $(wildcard tests/gpu/*.c))
GPU_TESTS    := $(patsubst tests/gpu/%.c,$(BUILD)/gpu/%,$(GPU_TEST_SRC))

$(BUILD)/obj/tests/gpu/%.o: CFLAGS += $(CUDA_CFLAGS)

$(BUILD)/gpu/%: $(BUILD)/obj/tests/gpu/%.o $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS) $(CUDA_LIBS)

gpu-test-bins: $(XPREC) $(GPU_TESTS) $(BUILD)/tests/test_engine

gpu-tests:
	$(MAKE) CUDA=1 gpu-test-bins

gpu-bundle:
	$(MAKE) CUDA=1 gpu-test-bins
	BUILD=$(BUILD) tests/gpu/bundle.sh $(BUILD)/gpu-bundle
