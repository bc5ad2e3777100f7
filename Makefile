# xprec: `make` builds build/bin/xprec and the engine library build/lib/libxprec.a (engine/ only:
# the module, the command line, tests and benchmarks all link it); `make check` installs missing
# dependencies, builds, and runs every test (unit tests plain and under ASan+UBSan, then pytest).

CC      ?= cc
BUILD   := build
WARN    := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wno-unused-parameter
CFLAGS  ?= -O2 -g
CFLAGS  += -std=c11 -D_GNU_SOURCE -pthread $(WARN) -Iengine -MMD -MP
# the toolkit and the tests see the toolkit's headers; the engine does not
$(BUILD)/obj/adapters/%.o $(BUILD)/san/obj/adapters/%.o $(BUILD)/obj/tests/%.o $(BUILD)/san/obj/tests/%.o: CFLAGS += -Iadapters
# what libxprec needs; OpenBLAS/LAPACKE only for the toolkit's linear algebra (SVD, extraction)
# and OpenSSL for xprec keyhash
LDLIBS  := -lcjson -lpcre2-8 -lutf8proc -lm -pthread
BLAS_LIBS := $(shell pkg-config --libs openblas 2>/dev/null || echo -lopenblas) -llapacke -lcrypto
SAN     := -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

ENGINE_SRC   := $(sort $(filter-out engine/cuda/%,$(wildcard engine/*.c engine/*/*.c)))
ADAPTERS_SRC := $(sort $(wildcard adapters/*.c))
CLI_MAIN     := adapters/main.c
TOOL_SRC     := $(filter-out $(CLI_MAIN),$(ADAPTERS_SRC))
UNIT_SRC     := $(sort $(wildcard tests/unit/test_*.c))
UNIT_SUPPORT := $(filter-out $(UNIT_SRC),$(wildcard tests/unit/*.c))

obj      = $(patsubst %.c,$(BUILD)/$(1)/%.o,$(2))
LIB      := $(BUILD)/lib/libxprec.a
LIB_SAN  := $(BUILD)/san/libxprec.a
LIB_PIC  := $(BUILD)/pic/libxprec.a
# the nginx module, built against Debian's nginx (nginx-dev) with its own configure flags
NGX_SRC  ?= /usr/share/nginx/src
NGX_DIR  := $(BUILD)/nginx/src
MODULE   := $(BUILD)/nginx/ngx_xprec_module.so
MODULE_SRC := $(wildcard ngx_xprec_module/*.c ngx_xprec_module/*.h) config
LUA_C    := $(BUILD)/redis/ngx_xprec_scripts.c
# the toolkit's objects as an archive: a test pulls in only the members it calls (svd, extract)
TOOLLIB  := $(BUILD)/lib/libxptool.a
TOOLLIB_SAN := $(BUILD)/san/libxptool.a
XPREC    := $(BUILD)/bin/xprec
XPREC_SAN:= $(BUILD)/san/bin/xprec
UNITS    := $(patsubst tests/unit/%.c,$(BUILD)/tests/%,$(UNIT_SRC))
UNITS_SAN:= $(patsubst tests/unit/%.c,$(BUILD)/san/tests/%,$(UNIT_SRC))

.PHONY: all check deps unit unit-san integration fuzz demo bench clean format module install
all: $(XPREC) $(LIB) $(MODULE)

$(BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/pic/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fPIC -c $< -o $@

$(BUILD)/san/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -O1 $(SAN) -c $< -o $@

$(LIB): $(call obj,obj,$(ENGINE_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

# the same library position-independent, for the nginx module (a shared object)
$(LIB_PIC): $(call obj,pic/obj,$(ENGINE_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(LIB_SAN): $(call obj,san/obj,$(ENGINE_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(TOOLLIB): $(call obj,obj,$(TOOL_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(TOOLLIB_SAN): $(call obj,san/obj,$(TOOL_SRC))
	@mkdir -p $(dir $@)
	rm -f $@ && ar rcs $@ $^

$(XPREC): $(call obj,obj,$(CLI_MAIN) $(TOOL_SRC)) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $^ $(BLAS_LIBS) $(LDLIBS)

$(XPREC_SAN): $(call obj,san/obj,$(CLI_MAIN) $(TOOL_SRC)) $(LIB_SAN)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(SAN) -o $@ $^ $(BLAS_LIBS) $(LDLIBS)

$(BUILD)/tests/%: $(BUILD)/obj/tests/unit/%.o $(call obj,obj,$(UNIT_SUPPORT)) $(TOOLLIB) $(LIB)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -o $@ $^ $(BLAS_LIBS) $(LDLIBS) -lcmocka

$(BUILD)/san/tests/%: $(BUILD)/san/obj/tests/unit/%.o $(call obj,san/obj,$(UNIT_SUPPORT)) $(TOOLLIB_SAN) $(LIB_SAN)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(SAN) -o $@ $^ $(BLAS_LIBS) $(LDLIBS) -lcmocka

$(NGX_DIR)/objs/Makefile: config $(NGX_SRC)/conf_flags $(LUA_C)
	rm -rf $(NGX_DIR) && mkdir -p $(dir $(NGX_DIR)) && cp -r $(NGX_SRC) $(NGX_DIR)
	cd $(NGX_DIR) && bash -c '. ./conf_flags && ./configure "$${NGX_CONF_FLAGS[@]}" \
	    --add-dynamic-module=$(CURDIR)' >$(CURDIR)/$(BUILD)/nginx/configure.log

$(LUA_C): $(wildcard redis/*.lua) scripts/lua2c.sh
	@mkdir -p $(dir $@)
	scripts/lua2c.sh $@ $(sort $(wildcard redis/*.lua))

$(MODULE): $(NGX_DIR)/objs/Makefile $(MODULE_SRC) $(LIB_PIC) $(LUA_C) engine/xprec.h
	rm -f $(NGX_DIR)/objs/ngx_xprec_module.so
	$(MAKE) -C $(NGX_DIR) -f objs/Makefile modules
	cp $(NGX_DIR)/objs/ngx_xprec_module.so $@

module: $(MODULE)

# as Debian's nginx module packages do: the .so, a load_module snippet, and its link
NGX_MODDIR ?= /usr/lib/nginx/modules
install: $(MODULE)
	install -D -m 644 $(MODULE) $(DESTDIR)$(NGX_MODDIR)/ngx_xprec_module.so
	install -d $(DESTDIR)/usr/share/nginx/modules-available $(DESTDIR)/etc/nginx/modules-enabled
	echo 'load_module modules/ngx_xprec_module.so;' \
	    >$(DESTDIR)/usr/share/nginx/modules-available/mod-http-xprec.conf
	ln -sf /usr/share/nginx/modules-available/mod-http-xprec.conf \
	    $(DESTDIR)/etc/nginx/modules-enabled/50-mod-http-xprec.conf
	install -D -m 755 $(XPREC) $(DESTDIR)/usr/bin/xprec

deps:
	scripts/deps.sh

unit: $(UNITS)
	scripts/run-unit.sh $(UNITS)
	@# the kernels again one instruction-set level down (AVX2 where AVX-512 was chosen)
	XPREC_SIMD=avx2 scripts/run-unit.sh $(BUILD)/tests/test_cpu_kernels $(BUILD)/tests/test_engine

unit-san: $(UNITS_SAN) $(XPREC_SAN)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    scripts/run-unit.sh $(UNITS_SAN)

integration: $(XPREC) $(XPREC_SAN)
	scripts/run-integration.sh

check: deps
	$(MAKE) -j$(shell nproc) all $(UNITS) $(UNITS_SAN) $(XPREC_SAN)
	$(MAKE) unit unit-san integration fuzz

# libFuzzer on the parsers (safetensors, config.json, tokenizer): make check replays the committed
# corpus with a fixed seed; FUZZ_SECONDS=N runs each target open-ended for N seconds instead
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

demo: deps
	$(MAKE) -j$(shell nproc) all
	scripts/demo.sh

bench: $(XPREC)
	bench/engine.sh

format:
	clang-format -i $(ENGINE_SRC) $(ADAPTERS_SRC) $(UNIT_SRC) $(wildcard engine/*.h engine/*/*.h adapters/*.h)

clean:
	rm -rf $(BUILD)/obj $(BUILD)/san $(BUILD)/pic $(BUILD)/lib $(BUILD)/bin $(BUILD)/tests \
	    $(BUILD)/nginx

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
-include cuda.mk
