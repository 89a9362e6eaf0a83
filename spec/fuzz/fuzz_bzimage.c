/*
** fuzz_bzimage.c - libFuzzer harness for the kernel file checks in Lua:
** kvm.bootparams.read_setup_header(bytes), kvm.linux.probe(path) and, for
** inputs probe accepts, kvm.linux.setup{kernel = path, memory = 16 MiB}.
**
** The contract checked: read_setup_header gives (hdr, info) or (nil,
** message) for any string, and a header it accepts packs into boot_params;
** probe and setup give a result or nil + message, never a Lua error.
*/
#include "fuzz_common.h"

static lua_State *L;

/* An in-kernel irqchip and PIT cost ~8 ms per VM on this host and the file
   checks do not depend on them: the harness's VMs are proxies that skip
   vm:irqchip() and vm:pit() and forward everything else. */
static const char *CHECK =
  "local kvm = require 'kvm'\n"
  "local real_vm = kvm.vm\n"
  "kvm.vm = function()\n"
  "  local vm, err = real_vm()\n"
  "  if not vm then return nil, err end\n"
  "  return setmetatable({}, { __index = function(_, k)\n"
  "    if k == 'irqchip' or k == 'pit' then return function() return true end end\n"
  "    local f = vm[k]\n"
  "    if type(f) == 'function' then return function(_, ...) return f(vm, ...) end end\n"
  "    return f\n"
  "  end })\n"
  "end\n"
  "local bp = require 'kvm.bootparams'\n"
  "local linux = require 'kvm.linux'\n"
  "local n = 0\n"
  "return function(bytes, path)\n"
  "  local ok, hdr, info = pcall(bp.read_setup_header, bytes)\n"
  "  if not ok then error('read_setup_header raised: ' .. tostring(hdr), 0) end\n"
  "  if hdr then\n"
  "    if type(info) ~= 'table' then error('read_setup_header: no info', 0) end\n"
  "    local okp, err = pcall(bp.pack, { hdr = hdr })\n"
  "    if not okp then error('pack of an accepted header raised: ' .. tostring(err), 0) end\n"
  "  elseif type(info) ~= 'string' then\n"
  "    error('read_setup_header: nil without a message', 0)\n"
  "  end\n"
  "  local okp, kind, pinfo = pcall(linux.probe, path)\n"
  "  if not okp then error('probe raised: ' .. tostring(kind), 0) end\n"
  "  if not kind then\n"
  "    if type(pinfo) ~= 'string' then error('probe: nil without a message', 0) end\n"
  "    return\n"
  "  end\n"
  "  local oks, ctx, msg = pcall(linux.setup, { kernel = path, memory = 16 << 20,\n"
  "                                            output = function() end, profile = false })\n"
  "  if not oks then error('setup raised: ' .. tostring(ctx), 0) end\n"
  "  if ctx then ctx.vm:close() elseif type(msg) ~= 'string' then\n"
  "    error('setup: nil without a message', 0)\n"
  "  end\n"
  "  n = n + 1\n"
  "  if n % 16 == 0 then collectgarbage() end   -- closed VMs' RAM is unmapped by the GC\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (L == NULL) {
    if (!fuzz_kvm_ok()) exit(1);
    L = fuzz_lua();
    fuzz_chunk(L, "fuzz_bzimage", CHECK);
  }
  const char *path = fuzz_file(data, size);
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_bzimage");
  lua_pushlstring(L, (const char *)data, size);
  lua_pushstring(L, path);
  if (lua_pcall(L, 2, 0, 0) != LUA_OK) fuzz_die(L, "fuzz_bzimage");
  return 0;
}
