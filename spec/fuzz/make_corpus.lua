--- Writes the seed corpus under spec/fuzz/corpus/{elf,bzimage,exit,virtio,snapshot}/
-- (run from the repository root: `lua5.4 spec/fuzz/make_corpus.lua`, after
-- `make`: the snapshot seeds ask this host's KVM for its CPUID). The seeds
-- are small valid (and nearly valid) inputs from which the fuzzers mutate.

local function write(dir, name, bytes)
  local f = assert(io.open("spec/fuzz/corpus/" .. dir .. "/" .. name, "wb"))
  f:write(bytes)
  f:close()
end

---------------------------------------------------------------- ELF
-- t: type, machine, entry, phnum, shnum, segments = {{type, paddr, vaddr,
-- data, memsz}}, sections = raw section header bytes
local function elf(t)
  local segs = t.segments or {}
  local at = 64 + 56 * #segs
  local placed, body = {}, {}
  for i, s in ipairs(segs) do placed[i] = at; body[i] = s.data or ""; at = at + #body[i] end
  local shoff = t.sections and at or 0
  local out = { string.pack("<c4BBBBBc7I2I2I4I8I8I8I4I2I2I2I2I2I2",
    "\x7fELF", 2, 1, 1, 0, 0, ("\0"):rep(7), t.type or 2, t.machine or 62, 1,
    t.entry or 0x100000, 64, shoff, 0, 64, 56, t.phnum or #segs, 64,
    t.shnum or (t.sections and 1 or 0), 0) }
  for i, s in ipairs(segs) do
    out[#out + 1] = string.pack("<I4I4I8I8I8I8I8I8", s.type or 1, 5, placed[i],
      s.vaddr or s.paddr, s.paddr, #body[i], s.memsz or #body[i], 0x1000)
  end
  for _, b in ipairs(body) do out[#out + 1] = b end
  if t.sections then out[#out + 1] = t.sections end
  return table.concat(out)
end

write("elf", "one_segment", elf{ segments = { { paddr = 0x100000, data = "\xf4" } } })
write("elf", "text_data_bss", elf{ entry = 0x100000, segments = {
  { paddr = 0x100000, data = ("\x90"):rep(32) .. "\xf4" },
  { paddr = 0x101000, data = "data", memsz = 0x2000 } } })
write("elf", "kernel_like", elf{ entry = -0x7f000000, segments = {
  { paddr = 0x200000, vaddr = -0x7f000000, data = ("\xcc"):rep(64), memsz = 0x1000 },
  { type = 4, paddr = 0, data = "note" } } })
write("elf", "high_memory", elf{ segments = { { paddr = 1 << 32, data = "high" } } })
write("elf", "dyn", elf{ type = 3, segments = { { paddr = 0x300000, data = "\xf4" } } })
-- e_phnum = PN_XNUM: the count is in section 0's sh_info
write("elf", "pn_xnum", elf{ phnum = 0xffff, shnum = 0, segments = { { paddr = 0x100000, data = "\xf4" } },
  sections = string.pack("<I4I4I8I8I8I8I4I4I8I8", 0, 0, 0, 0, 0, 0, 0, 1, 0, 0) })

---------------------------------------------------------------- bzImage
local function poke(s, off, fmt, ...)
  local v = string.pack(fmt, ...)
  if #s < off + #v then s = s .. ("\0"):rep(off + #v - #s) end
  return s:sub(1, off) .. v .. s:sub(off + #v + 1)
end

local function bzimage(t)
  local sects = t.setup_sects or 1
  local s = ("\0"):rep(((sects == 0 and 4 or sects) + 1) * 512)
  s = poke(s, 0x1f1, "<I1", sects)
  s = poke(s, 0x1fe, "<I2", 0xaa55)
  s = poke(s, 0x200, "<BB", 0xeb, t.jump or 0x6a)
  s = poke(s, 0x202, "c4", "HdrS")
  s = poke(s, 0x206, "<I2", t.version or 0x020f)
  s = poke(s, 0x211, "<I1", 0x01)
  s = poke(s, 0x22c, "<I4", 0x7fffffff)
  s = poke(s, 0x230, "<I4", 0x200000)
  s = poke(s, 0x234, "<I1", t.relocatable or 1)
  s = poke(s, 0x236, "<I2", 0x3)
  s = poke(s, 0x238, "<I4", t.cmdline_size or 2047)
  s = poke(s, 0x258, "<I8", t.pref_address or 0x400000)
  s = poke(s, 0x260, "<I4", t.init_size or 0x10000)
  return s .. (t.payload or ("\xf4"):rep(512))
end

write("bzimage", "v2_15", bzimage{})
write("bzimage", "setup_sects_0", bzimage{ setup_sects = 0 })
write("bzimage", "v2_12_short_header", bzimage{ version = 0x020c, jump = 0x40 })
write("bzimage", "not_relocatable", bzimage{ relocatable = 0 })
write("bzimage", "small_cmdline_size", bzimage{ cmdline_size = 255 })
write("bzimage", "elf", elf{ segments = { { paddr = 0x100000, data = "\xf4" } } })

---------------------------------------------------------------- kvm_run pages
-- byte 0: flags (bit 0: unclaimed = "ignore"); then struct kvm_run
-- (exit_reason at 8, the union at 32); string I/O data at 0x200
local function page(reason, union, data)
  local s = ("\0"):rep(32)
  s = poke(s, 8, "<I4", reason)
  s = s .. union
  if data then s = poke(s, 0x200, "c" .. #data, data) end
  return s
end
local function io_(dir, size, port, count, data)
  return page(2, string.pack("<BBI2I4I8", dir, size, port, count, 0x200), data)
end
local function mmio(addr, data, len, is_write)
  return page(6, string.pack("<I8c8I4B", addr, data, len, is_write and 1 or 0))
end

local EXIT = {
  serial_out = io_(1, 1, 0x3f8, 1, "A"),
  serial_regs = io_(1, 1, 0x3fb, 4, "\x80\x03\x00\x0f"),
  serial_in = io_(0, 1, 0x3fd, 2),
  lua_out = io_(1, 2, 0x10, 8, ("\x34\x12"):rep(8)),
  lua_in = io_(0, 4, 0x11, 4),
  lua_error = io_(1, 1, 0x13, 1, "x"),
  lua_replace = io_(1, 1, 0x16, 3, "abc"),
  lua_stop = io_(0, 1, 0x12, 16),
  high_ports = io_(0, 2, 0xfffe, 2),
  i8042 = io_(1, 1, 0x64, 1, "\xfe"),
  cmos = io_(1, 1, 0x70, 2, "\x0a\x0b"),
  pci = io_(1, 4, 0xcf8, 1, "\x00\x00\x00\x80"),
  debug_exit = io_(1, 1, 0x501, 1, "\x2a"),
  unclaimed = io_(1, 1, 0x2000, 1, "z"),
  mmio_write = mmio(0xd0000000, "\1\2\3\4\5\6\7\8", 8, true),
  mmio_read = mmio(0xd0000004, ("\0"):rep(8), 4, false),
  mmio_stop = mmio(0xd0000001, ("\0"):rep(8), 1, false),
  mmio_top = mmio(-0x10, ("\0"):rep(8), 2, false),
  mmio_unclaimed = mmio(0x1000, "\1\2\3\4\5\6\7\8", 8, true),
  internal = page(17, string.pack("<I4I4I8I1", 1, 3, 1, 15) .. ("\x0f\x01\xca"):rep(5)),
  system_event = page(24, string.pack("<I4I4I8", 2, 1, 0)),
  fail_entry = page(9, string.pack("<I8I4", 0x80000021, 0)),
  hlt = page(5, ""),
  shutdown = page(8, ""),
  exception = page(1, string.pack("<I4I4", 6, 0)),
}
for name, p in pairs(EXIT) do
  write("exit", name, "\0" .. p)
  if name:match("unclaimed") then write("exit", name .. "_ignore", "\1" .. p) end
end
---------------------------------------------------------------- virtio
-- fuzz_virtio.c's input: QueueNum pick, the desc/avail/used offsets in the
-- region, notifies and their avail indexes, then the region (at 0x10000)
local function vq(num_pick, avail_idx, descs, ring)
  local region = {}
  local d = {}
  for i, x in ipairs(descs) do d[i] = string.pack("<I8I4I2I2", x[1], x[2], x[3], x[4] or 0) end
  region[1] = table.concat(d)
  region[1] = region[1] .. ("\0"):rep(0x1000 - #region[1])
  local avail = string.pack("<I2I2", 0, avail_idx)
  for _, h in ipairs(ring) do avail = avail .. string.pack("<I2", h) end
  region[2] = avail .. ("\0"):rep(0x1000 - #avail)
  return string.pack("<BI2I2I2BI2I2I2I2", num_pick, 0, 0x1000, 0x2000, 1, avail_idx, avail_idx, 0, 0)
    .. table.concat(region) .. ("\0"):rep(0x100) .. ("\x11"):rep(64)
end
local VIRTIO = {
  one = vq(5, 1, { { 0x13000, 16, 1, 1 }, { 0x13100, 64, 2 } }, { 0 }),
  two = vq(5, 2, { { 0x13000, 16, 0 }, { 0x13100, 512, 2 } }, { 0, 1 }),
  loop = vq(5, 1, { { 0x13000, 16, 1, 1 }, { 0x13100, 64, 3, 0 } }, { 0 }),
  outside = vq(4, 1, { { 0x30000, 16, 2 } }, { 0 }),
  indirect = vq(4, 1, { { 0x13000, 16, 4 } }, { 0 }),
  full = vq(10, 256, { { 0x13000, 16, 2 } }, {}),
}
for name, bytes in pairs(VIRTIO) do write("virtio", name, bytes) end

---------------------------------------------------------------- snapshot files
-- snapshot files (csrc/snapfile.c) built by spec/snapfile_build.lua, small
-- enough for make fuzz-run's -max_len (16 KiB): a VM with one 64 KiB region
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath
local build = require "snapfile_build"
local B = build.KIND
local code = "\xb0\x41\xe6\xe9\xf4"                  -- mov al, 'A'; out 0xe9, al; hlt
local SNAPSHOT = {
  tiny = build.file{
    parts = { { kind = B.vm, data = build.record(1, ("\1"):rep(64)) .. build.record(4, ("\2"):rep(72)) },
              build.vcpu(0),
              { kind = B.device, id = 0, name = "uart", addr = 0x3f8, data = "\1\0\0\0" .. ("\0"):rep(12) } },
    meta = "seed", mem = { { size = 0x10000, pages = { [1] = code, [15] = ("\x5a"):rep(64) } } } },
  empty = build.file{},
  two_vcpus = build.file{
    parts = { build.vcpu(0), build.vcpu(1), { kind = B.device, id = 1, name = "debugexit", addr = 0xf4 } },
    mem = { { size = 0x10000, pages = { [0] = code } }, { slot = 1, guest = 1 << 32, size = 0x40000 } } },
}
-- and two vm:snapshot() files of a VM with a UART that said 'A' and halted
-- (with the in-kernel irqchip, PIT and clock, and without)
local kvm = require "kvm"
local x86 = require "kvm.x86"
for _, irqchip in ipairs{ false, true } do
  local vm = assert(kvm.vm())
  local ram = vm:memory{ guest = 0, size = 0x10000 }
  if irqchip then assert(vm:irqchip()) end
  vm:serial{ port = 0x3f8, output = function() end }
  local cpu = assert(vm:vcpu(0))
  x86.real_mode(cpu)
  ram:write(0x1000, "\xb0\x41\xba\xf8\x03\xee\xf4")   -- mov al, 'A'; mov dx, 0x3f8; out dx, al; hlt
  cpu:set_regs{ rip = 0x1000, rsp = 0x8000, rflags = 2 }
  cpu:run()
  local path = os.tmpname()
  assert(assert(vm:snapshot()):save(path))
  local f = assert(io.open(path, "rb"))
  SNAPSHOT[irqchip and "vm_snapshot_irqchip" or "vm_snapshot"] = f:read("a")
  f:close()
  os.remove(path)
  vm:close()
end
for name, bytes in pairs(SNAPSHOT) do
  assert(#bytes <= 16384, name)
  write("snapshot", name, bytes)
end
print("corpus written")
