/*
** fuzz_exit.c - libFuzzer harness for the run loop (csrc/run.c), the bus
** and its devices (csrc/bus.c and the device files) and the exit decoder
** (csrc/exit.c), fed a kvm_run page of fuzzed bytes: exit_reason,
** io.size/count/port/data_offset, mmio.len, internal.ndata, ... are all
** whatever the input says.
**
** Driven through the interfaces: a real VM and vCPU are made once, with Lua
** port and MMIO handlers that return values, nil, kvm.STOP/POWEROFF, bad
** types and errors, and replace their own claims; two UARTs, the legacy
** ports, the power device, a debug console and a debug-exit port. For each
** input the vCPU's kvm_run pointer is pointed at the fuzzed page and its
** KVM_RUN (Vcpu.enter) at a function that returns that one exit; cpu:run
** {max_exits = 1} dispatches it as it would any exit. The Exit that results
** is printed, copied and replied to. ASan/UBSan are the oracle.
**
** Input: byte 0 bit 0 = run{unclaimed = "ignore"}; the rest is the page.
*/
#include "fuzz_common.h"

#include <errno.h>

#include "luakvm.h"

static lua_State *L;
static uint8_t *page;
static size_t page_size;

static const char *SETUP =
  "local kvm = require 'kvm'\n"
  "local vm = assert(kvm.vm())\n"
  "vm:memory{ guest = 0, size = 1 << 20 }\n"
  "local cpu = assert(vm:vcpu(0))\n"
  "local out = 0\n"
  "vm:serial{ output = function(b) out = out + #b end }\n"
  "vm:serial{ port = 0x2f8, irq = 3, output = false }\n"
  "vm:legacy_ports()\n"
  "vm:power()\n"
  "vm:debugcon{ output = function(b) out = out + #b end }\n"
  "vm:debug_exit(0x501)\n"
  "local low\n"
  "low = function(port, dir, size, value)\n"
  "  local k = port & 0xf\n"
  "  if k == 1 then return nil\n"
  "  elseif k == 2 then return kvm.STOP\n"
  "  elseif k == 3 then error('handler error')\n"
  "  elseif k == 4 then return 'a string'\n"
  "  elseif k == 5 then return 1.5\n"
  "  elseif k == 6 then vm:on_io({ 0x10, 0x1f }, nil); vm:on_io({ 0x10, 0x1f }, low)\n"
  "  elseif k == 7 then vm:on_io({ 0x10, 0x1f }, nil)\n"
  "  elseif k == 8 then cpu:stop()\n"
  "  elseif k == 9 then return kvm.POWEROFF\n"
  "  end\n"
  "  return math.mininteger | port\n"
  "end\n"
  "vm:on_io({ 0x10, 0x1f }, low)\n"
  "vm:on_io({ 0x8000, 0xffff }, function(port) return 0x5a end)\n"
  "vm:on_mmio(0xd0000000, 0x1000, function(addr, dir, len, value)\n"
  "  local k = addr & 3\n"
  "  if k == 1 then return kvm.STOP elseif k == 2 then error('mmio error') end\n"
  "  return -1\n"
  "end)\n"
  "vm:on_mmio(-0x1000, 0x1000, function() return 7 end)\n"
  "local function check(ignore)\n"
  "  -- the claims a handler may have dropped\n"
  "  pcall(vm.on_io, vm, { 0x10, 0x1f }, low)\n"
  "  local ok, e = pcall(cpu.run, cpu, { max_exits = 1, unclaimed = ignore and 'ignore' or 'return' })\n"
  "  if not ok then return end                 -- a handler's error: fine\n"
  "  if type(e.reason) ~= 'string' then error('exit without a reason', 0) end\n"
  "  local s = tostring(e)\n"
  "  local f = e:fields()\n"
  "  pcall(e.reply, e, 0x1234)\n"
  "  pcall(e.reply, e, '\\1\\2\\3\\4')\n"
  "  pcall(e.reply, e, f.data or '')\n"
  "end\n"
  "return { cpu = cpu, check = check }\n";

/* KVM_RUN, faked: the fuzzed page is the exit, once; then an interruption
   (no second exit is dispatched: run() returns "max_exits" before) */
static int entered;
static int fuzz_enter(Vcpu *c) {
  (void)c;
  if (entered++ == 0) return 0;
  errno = EINTR;
  return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (L == NULL) {
    if (!fuzz_kvm_ok()) exit(1);
    L = fuzz_lua();
    fuzz_chunk(L, "fuzz_exit", SETUP);
  }
  if (size < 1) return 0;
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_exit");
  int t = lua_gettop(L);
  lua_getfield(L, t, "cpu");
  Vcpu *c = (Vcpu *)luaL_checkudata(L, -1, VCPU_MT);
  lua_pop(L, 1);
  if (page == NULL) {
    page_size = c->run_size;
    page = malloc(page_size);
    if (page == NULL) abort();
  }
  memset(page, 0, page_size);
  memcpy(page, data + 1, size - 1 < page_size ? size - 1 : page_size);
  struct kvm_run *real = c->run;
  c->run = (struct kvm_run *)page;      /* restored below, before anything else runs */
  c->enter = fuzz_enter;
  entered = 0;
  lua_getfield(L, t, "check");
  lua_pushboolean(L, data[0] & 1);
  int st = lua_pcall(L, 1, 0, 0);
  c->run = real;
  c->enter = kvm_enter;
  if (st != LUA_OK) fuzz_die(L, "fuzz_exit");
  lua_settop(L, 0);
  return 0;
}
