/*
** fuzz_elf.c - libFuzzer harness for vm:load_elf (csrc/elf.c).
**
** The input is an ELF file. It is written to a memfd and loaded with
** vm:load_elf(path) and vm:load_elf(path, {physical = false}) into a VM
** with 16 MiB of RAM at 0 and 1 MiB at 4 GiB. The contract checked: a
** table whose segments lie inside guest memory, or nil + a message naming
** the file; never a Lua error. ASan/UBSan catch the rest.
*/
#include "fuzz_common.h"

static lua_State *L;

static const char *CHECK =
  "local kvm = require 'kvm.core'\n"
  "local vm = assert(kvm.vm())\n"
  "local low = vm:memory{ guest = 0, size = 16 << 20 }\n"
  "local high = vm:memory{ guest = 1 << 32, size = 1 << 20 }\n"
  "local function inside(a, n)\n"
  "  if n == 0 then return true end\n"
  "  local e = a + n\n"
  "  if math.ult(e, a) then return false end\n"
  "  return (not math.ult(16 << 20, e)) or\n"
  "         (not math.ult(a, 1 << 32) and not math.ult((1 << 32) + (1 << 20), e))\n"
  "end\n"
  "local function one(path, physical)\n"
  "  local ok, info, msg = pcall(vm.load_elf, vm, path, { physical = physical })\n"
  "  if not ok then error('load_elf raised: ' .. tostring(info), 0) end\n"
  "  if info == nil then\n"
  "    if type(msg) ~= 'string' or msg:sub(1, #path + 2) ~= path .. ': ' then\n"
  "      error('nil without a proper message: ' .. tostring(msg), 0)\n"
  "    end\n"
  "    return\n"
  "  end\n"
  "  for _, s in ipairs(info.segments) do\n"
  "    local at = physical and s.paddr or s.vaddr\n"
  "    if not inside(at, s.memsz) then error('segment outside memory accepted', 0) end\n"
  "  end\n"
  "end\n"
  "return function(path)\n"
  "  one(path, true)\n"
  "  one(path, false)\n"
  "end\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (L == NULL) {
    if (!fuzz_kvm_ok()) exit(1);
    L = fuzz_lua();
    fuzz_chunk(L, "fuzz_elf", CHECK);
  }
  const char *path = fuzz_file(data, size);
  lua_getfield(L, LUA_REGISTRYINDEX, "fuzz_elf");
  lua_pushstring(L, path);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) fuzz_die(L, "fuzz_elf");
  return 0;
}
