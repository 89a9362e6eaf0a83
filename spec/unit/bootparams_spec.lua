-- kvm.bootparams: every offset against <asm/bootparam.h>, pack/unpack on known
-- bytes, and read_setup_header on synthetic headers.
package.path = "./lua/?.lua;./lua/?/init.lua;" .. package.path

local bp = require "kvm.bootparams"

local function u(fmt, s, off) return (string.unpack(fmt, s, off + 1)) end

-- Compile and run a C program printing name=offset:size for every field of the
-- Lua tables, taken from the kernel's own struct definitions.
local function kernel_layout()
  local lines = {
    "#include <stdio.h>",
    "#include <stddef.h>",
    "#include <asm/bootparam.h>",
    "#define SZ(type, path) sizeof(((type *)0)->path)",
    "#define F(path, name) \\",
    "  printf(\"%s=%zu:%zu\\n\", name, offsetof(struct boot_params, path), SZ(struct boot_params, path))",
    "int main(void) {",
  }
  for _, f in ipairs(bp.hdr_fields) do
    lines[#lines + 1] = string.format('  F(hdr.%s, "hdr.%s");', f[1], f[1])
  end
  for _, f in ipairs(bp.fields) do
    lines[#lines + 1] = string.format('  F(%s, "%s");', f[1], f[1])
  end
  for _, x in ipairs{ "hdr", "e820_entries", "e820_table", "sentinel" } do
    lines[#lines + 1] = string.format('  F(%s, "%s");', x, x)
  end
  lines[#lines + 1] = '  printf("sizeof_boot_params=%zu:0\\n", sizeof(struct boot_params));'
  lines[#lines + 1] = '  printf("sizeof_e820_entry=%zu:0\\n", sizeof(struct boot_e820_entry));'
  lines[#lines + 1] = '  printf("e820.addr=%zu:%zu\\n", offsetof(struct boot_e820_entry, addr),'
    .. ' SZ(struct boot_e820_entry, addr));'
  lines[#lines + 1] = '  printf("e820.size=%zu:%zu\\n", offsetof(struct boot_e820_entry, size),'
    .. ' SZ(struct boot_e820_entry, size));'
  lines[#lines + 1] = '  printf("e820.type=%zu:%zu\\n", offsetof(struct boot_e820_entry, type),'
    .. ' SZ(struct boot_e820_entry, type));'
  lines[#lines + 1] = '  printf("E820_MAX_ENTRIES_ZEROPAGE=%d:0\\n", E820_MAX_ENTRIES_ZEROPAGE);'
  for _, c in ipairs{ "LOADED_HIGH", "KASLR_FLAG", "QUIET_FLAG", "KEEP_SEGMENTS", "CAN_USE_HEAP",
                      "XLF_KERNEL_64", "XLF_CAN_BE_LOADED_ABOVE_4G", "XLF_EFI_HANDOVER_32",
                      "XLF_EFI_HANDOVER_64", "XLF_EFI_KEXEC", "XLF_5LEVEL", "XLF_5LEVEL_ENABLED",
                      "SETUP_NONE", "SETUP_E820_EXT", "SETUP_DTB", "SETUP_PCI", "SETUP_EFI", "SETUP_RNG_SEED" } do
    lines[#lines + 1] = string.format('  printf("const.%s=%%d:0\\n", (int)(%s));', c, c)
  end
  lines[#lines + 1] = "  return 0;\n}\n"

  local src = os.tmpname()
  local exe = os.tmpname()
  local f = assert(io.open(src .. ".c", "w"))
  f:write(table.concat(lines, "\n"))
  f:close()
  local cc = os.getenv("CC") or "gcc"
  local ok = os.execute(string.format("%s -o %s %s.c 2>&1", cc, exe, src))
  os.remove(src .. ".c")
  os.remove(src)
  assert(ok, "compiling the offset probe failed (is gcc installed with the kernel headers?)")
  local p = assert(io.popen(exe))
  local out = {}
  for line in p:lines() do
    local name, off, size = line:match("^([%w_.]+)=(%d+):(%d+)$")
    assert(name, "bad probe output: " .. line)
    out[name] = { offset = tonumber(off), size = tonumber(size) }
  end
  p:close()
  os.remove(exe)
  return out
end

describe("kvm.bootparams layout", function()
  local k = kernel_layout()

  it("matches <asm/bootparam.h> for every setup_header field", function()
    assert.are.equal(39, #bp.hdr_fields)
    for _, f in ipairs(bp.hdr_fields) do
      local kf = k["hdr." .. f[1]]
      assert.are.equal(kf.offset, f[2], "offset of hdr." .. f[1])
      assert.are.equal(kf.size, string.packsize(f[3]), "size of hdr." .. f[1])
      assert.are.equal("<", f[3]:sub(1, 1), "little-endian hdr." .. f[1])
    end
  end)

  it("matches <asm/bootparam.h> for every boot_params field", function()
    for _, f in ipairs(bp.fields) do
      local kf = k[f[1]]
      assert.are.equal(kf.offset, f[2], "offset of " .. f[1])
      assert.are.equal(kf.size, string.packsize(f[3]), "size of " .. f[1])
    end
  end)

  it("has the kernel's sizes, e820 table and constants", function()
    assert.are.equal(k.sizeof_boot_params.offset, bp.SIZE)
    assert.are.equal(k.hdr.offset, bp.HDR_OFFSET)
    assert.are.equal(k.e820_table.offset, bp.E820_OFFSET)
    assert.are.equal(k.e820_entries.offset, bp.E820_ENTRIES_OFFSET)
    assert.are.equal(1, k.e820_entries.size)
    assert.are.equal(k.sizeof_e820_entry.offset, bp.E820_ENTRY_SIZE)
    assert.are.equal(k.E820_MAX_ENTRIES_ZEROPAGE.offset, bp.E820_MAX)
    assert.are.equal(bp.E820_MAX * bp.E820_ENTRY_SIZE, k.e820_table.size)
    assert.are.same({ 0, 8, 8, 8, 16, 4 }, { k["e820.addr"].offset, k["e820.addr"].size,
      k["e820.size"].offset, k["e820.size"].size, k["e820.type"].offset, k["e820.type"].size })
    for name, v in pairs(k) do
      local c = name:match("^const%.(.*)$")
      if c then assert.are.equal(v.offset, bp[c], c) end
    end
  end)

  it("has the documented offsets", function()
    local want = {
      setup_sects = 0x1f1, root_flags = 0x1f2, syssize = 0x1f4, ram_size = 0x1f8, vid_mode = 0x1fa,
      root_dev = 0x1fc, boot_flag = 0x1fe, jump = 0x200, header = 0x202, version = 0x206,
      realmode_swtch = 0x208, start_sys_seg = 0x20c, kernel_version = 0x20e, type_of_loader = 0x210,
      loadflags = 0x211, setup_move_size = 0x212, code32_start = 0x214, ramdisk_image = 0x218,
      ramdisk_size = 0x21c, bootsect_kludge = 0x220, heap_end_ptr = 0x224, ext_loader_ver = 0x226,
      ext_loader_type = 0x227, cmd_line_ptr = 0x228, initrd_addr_max = 0x22c, kernel_alignment = 0x230,
      relocatable_kernel = 0x234, min_alignment = 0x235, xloadflags = 0x236, cmdline_size = 0x238,
      hardware_subarch = 0x23c, hardware_subarch_data = 0x240, payload_offset = 0x248,
      payload_length = 0x24c, setup_data = 0x250, pref_address = 0x258, init_size = 0x260,
      handover_offset = 0x264, kernel_info_offset = 0x268,
    }
    local n = 0
    for _, f in ipairs(bp.hdr_fields) do
      assert.are.equal(want[f[1]], f[2], f[1]); n = n + 1
    end
    assert.are.equal(39, n)
    local top = { acpi_rsdp_addr = 0x70, ext_ramdisk_image = 0xc0, ext_ramdisk_size = 0xc4,
      ext_cmd_line_ptr = 0xc8, sentinel = 0x1ef }
    for _, f in ipairs(bp.fields) do
      if top[f[1]] then assert.are.equal(top[f[1]], f[2], f[1]) end
    end
    assert.are.equal(0x1e8, bp.E820_ENTRIES_OFFSET)
    assert.are.equal(0x2d0, bp.E820_OFFSET)
    assert.are.equal(0x1f1, bp.HDR_OFFSET)
  end)

  it("has the listed constants", function()
    assert.are.same({ 1, 2, 0x20, 0x40, 0x80, 1, 2, 1, 2, 3, 4, 5 }, {
      bp.LOADED_HIGH, bp.KASLR_FLAG, bp.QUIET_FLAG, bp.KEEP_SEGMENTS, bp.CAN_USE_HEAP,
      bp.XLF_KERNEL_64, bp.XLF_CAN_BE_LOADED_ABOVE_4G,
      bp.E820_RAM, bp.E820_RESERVED, bp.E820_ACPI, bp.E820_NVS, bp.E820_UNUSABLE })
  end)
end)

describe("kvm.bootparams.pack", function()
  it("is 4096 zero bytes for an empty table", function()
    assert.are.equal(string.rep("\0", 4096), bp.pack{})
  end)

  it("puts fields at their offsets, little-endian", function()
    local b = bp.pack{
      hdr = { type_of_loader = 0xff, loadflags = 0x81, cmd_line_ptr = 0x20000, ramdisk_image = 0x12345678,
              ramdisk_size = 0x1000, setup_data = 0xffffffff81000000, vid_mode = 0xffff },
      ext_ramdisk_image = 1, ext_cmd_line_ptr = 2, acpi_rsdp_addr = 0xe0000, sentinel = 0,
    }
    assert.are.equal(4096, #b)
    assert.are.equal("\xff\x81", b:sub(0x211, 0x212))
    assert.are.equal("\x00\x00\x02\x00", b:sub(0x229, 0x22c))
    assert.are.equal("\x78\x56\x34\x12\x00\x10\x00\x00", b:sub(0x219, 0x220))
    assert.are.equal("\x00\x00\x00\x81\xff\xff\xff\xff", b:sub(0x251, 0x258))
    assert.are.equal("\xff\xff", b:sub(0x1fb, 0x1fc))
    assert.are.equal("\x01\0\0\0\x00\0\0\0\x02\0\0\0", b:sub(0xc1, 0xcc))
    assert.are.equal("\x00\x00\x0e\x00\x00\x00\x00\x00", b:sub(0x71, 0x78))
    -- nothing else set
    local nonzero = 0
    for i = 1, #b do if b:byte(i) ~= 0 then nonzero = nonzero + 1 end end
    assert.are.equal(2 + 1 + 4 + 1 + 5 + 2 + 1 + 1 + 1, nonzero)
  end)

  it("packs the e820 table and its count", function()
    local b = bp.pack{ e820 = {
      { addr = 0, size = 0x9fc00, type = 1 },
      { addr = 0x9fc00, size = 0x400, type = 2 },
      { addr = 0x100000, size = 0xfff00000, type = 1 },
    } }
    assert.are.equal(3, b:byte(0x1e8 + 1))
    assert.are.equal("\0\0\0\0\0\0\0\0" .. "\x00\xfc\x09\0\0\0\0\0" .. "\x01\0\0\0",
      b:sub(0x2d0 + 1, 0x2d0 + 20))
    assert.are.equal(0x9fc00, u("<I8", b, 0x2d0 + 20))
    assert.are.equal(2, u("<I4", b, 0x2d0 + 20 + 16))
    assert.are.equal(0x100000, u("<I8", b, 0x2d0 + 40))
    assert.are.equal(0xfff00000, u("<I8", b, 0x2d0 + 48))
    assert.are.equal(string.rep("\0", 20), b:sub(0x2d0 + 61, 0x2d0 + 80))
  end)

  it("accepts an object with entries()", function()
    local function entries() return { { addr = 0, size = 4096, type = 1 } } end
    local map = setmetatable({}, { __index = { entries = entries } })
    local b = bp.pack{ e820 = map }
    assert.are.equal(1, b:byte(0x1e9))
    assert.are.equal(4096, u("<I8", b, 0x2d8))
  end)

  it("accepts 128 e820 entries", function()
    local l = {}
    for i = 1, 128 do l[i] = { addr = i << 12, size = 4096, type = 1 } end
    local b = bp.pack{ e820 = l }
    assert.are.equal(128, b:byte(0x1e9))
    assert.are.equal(128 << 12, u("<I8", b, 0x2d0 + 127 * 20))
  end)

  it("round-trips through unpack", function()
    local t = {
      hdr = { setup_sects = 0x27, type_of_loader = 0xff, loadflags = bp.LOADED_HIGH | bp.CAN_USE_HEAP,
              cmd_line_ptr = 0x20000, heap_end_ptr = 0xfe00, pref_address = -0x7f000000 },
      e820 = { { addr = 0, size = 0x9fc00, type = 1 }, { addr = -4096, size = 4096, type = 2 } },
      ext_ramdisk_size = 0xffffffff, tboot_addr = 0x1234,
    }
    local back = assert(bp.unpack(bp.pack(t)))
    assert.are.same(t.e820, back.e820)
    for k, v in pairs(t.hdr) do assert.are.equal(v, back.hdr[k], k) end
    assert.are.equal(0, back.hdr.ramdisk_image)
    assert.are.equal(0xffffffff, back.ext_ramdisk_size)
    assert.are.equal(0x1234, back.tboot_addr)
    assert.are.equal(0, back.sentinel)
    assert.are.equal(bp.pack(t), bp.pack(back))
  end)

  local bad = {
    { "a non-table", 1, "bootparams.pack: expected a table, got number" },
    { "an unknown field", { ext_ramdisk = 1 }, "bootparams.pack: unknown boot_params field 'ext_ramdisk'" },
    { "an unknown hdr field", { hdr = { cmdline = 1 } },
      "bootparams.pack: unknown setup_header field 'cmdline'" },
    { "a non-table hdr", { hdr = 5 }, "bootparams.pack: hdr must be a table, got number" },
    { "a u8 overflow", { hdr = { setup_sects = 0x100 } },
      "bootparams.pack: hdr.setup_sects: 0x100 does not fit in u8" },
    { "a u16 overflow", { hdr = { jump = 0x10000 } }, "bootparams.pack: hdr.jump: 0x10000 does not fit in u16" },
    { "a u32 overflow", { hdr = { ramdisk_image = 0x100000000 } },
      "bootparams.pack: hdr.ramdisk_image: 0x100000000 does not fit in u32" },
    { "a negative u32", { ext_cmd_line_ptr = -1 },
      "bootparams.pack: ext_cmd_line_ptr: 0xffffffffffffffff does not fit in u32" },
    { "a float", { hdr = { cmd_line_ptr = 1.5 } },
      "bootparams.pack: hdr.cmd_line_ptr: expected an integer, got float" },
    { "a string", { sentinel = "x" }, "bootparams.pack: sentinel: expected an integer, got string" },
    { "a bad e820 list", { e820 = 3 }, "bootparams.pack: e820 must be a list of {addr=, size=, type=}, got number" },
    { "a bad e820 entry", { e820 = { 3 } }, "bootparams.pack: e820[1] must be a table, got number" },
    { "an e820 entry without size", { e820 = { { addr = 0, type = 1 } } },
      "bootparams.pack: e820[1].size: expected an integer, got nil" },
    { "an e820 type overflow", { e820 = { { addr = 0, size = 1, type = 1 << 32 } } },
      "bootparams.pack: e820[1].type: 0x100000000 does not fit in u32" },
    { "an unknown e820 key", { e820 = { { addr = 0, size = 1, type = 1, kind = 1 } } },
      "bootparams.pack: e820[1]: unknown field 'kind'" },
    { "a wrong e820_entries", { e820_entries = 2, e820 = { { addr = 0, size = 1, type = 1 } } },
      "bootparams.pack: e820_entries = 2 but #e820 = 1" },
  }
  for _, c in ipairs(bad) do
    it("raises on " .. c[1], function()
      assert.has_error(function() bp.pack(c[2]) end, c[3])
    end)
  end

  it("raises on more than 128 e820 entries", function()
    local l = {}
    for i = 1, 129 do l[i] = { addr = i << 12, size = 4096, type = 1 } end
    assert.has_error(function() bp.pack{ e820 = l } end,
      "bootparams.pack: 129 e820 entries (at most 128 fit in the zero page)")
  end)

  it("accepts a consistent e820_entries", function()
    assert.are.equal(1, bp.pack{ e820_entries = 1, e820 = { { addr = 0, size = 1, type = 1 } } }:byte(0x1e9))
  end)
end)

describe("kvm.bootparams.unpack", function()
  it("raises on a bad argument", function()
    assert.has_error(function() bp.unpack(nil) end, "bootparams.unpack: expected a string, got nil")
    assert.has_error(function() bp.unpack("abc") end, "bootparams.unpack: need 4096 bytes, got 3")
  end)
  it("returns nil, msg for an impossible e820 count", function()
    local b = string.rep("\0", 0x1e8) .. "\200" .. string.rep("\0", 4096 - 0x1e9)
    local t, err = bp.unpack(b)
    assert.is_nil(t)
    assert.are.equal("e820_entries = 200 exceeds 128", err)
  end)
  it("reads every field, zero or not", function()
    local t = bp.unpack(string.rep("\0", 4096))
    assert.are.equal(0, t.hdr.kernel_info_offset)
    assert.are.equal(0, t.acpi_rsdp_addr)
    assert.are.same({}, t.e820)
  end)
end)

-- A synthetic bzImage head: the setup header as a 2.15 kernel has it.
local function image(over)
  over = over or {}
  local b = bp.pack{ hdr = {
    setup_sects = over.setup_sects or 0x27, boot_flag = 0xaa55,
    jump = over.jump or 0x6aeb,              -- jmp short +0x6a: header ends at 0x26c
    header = over.header or bp.HDRS_MAGIC,
    version = over.version or 0x020f,
    loadflags = bp.LOADED_HIGH, cmd_line_ptr = 0, initrd_addr_max = 0x7fffffff,
    kernel_alignment = 0x200000, relocatable_kernel = 1,
    xloadflags = over.xloadflags or 0x7f, cmdline_size = 0x7ff,
    pref_address = 0x1000000, init_size = 0x3378000, kernel_info_offset = 0xd7f91c,
  } }
  return b:sub(1, over.len or 1024)
end

describe("kvm.bootparams.read_setup_header", function()
  it("reads a 2.15 header", function()
    local hdr, info = bp.read_setup_header(image())
    assert.are.same({ setup_sects = 0x27, kernel_offset = 0x5000, header_end = 0x26c,
      version = "2.15", major = 2, minor = 15 }, info)
    assert.are.equal(0x53726448, hdr.header)
    assert.are.equal(0x020f, hdr.version)
    assert.are.equal(0x7f, hdr.xloadflags)
    assert.are.equal(0x1000000, hdr.pref_address)
    assert.are.equal(0x3378000, hdr.init_size)
    assert.are.equal(0xd7f91c, hdr.kernel_info_offset)
    assert.are.equal(0x7ff, hdr.cmdline_size)
    assert.are.equal(39, (function() local n = 0 for _ in pairs(hdr) do n = n + 1 end return n end)())
  end)

  it("reads the known bytes of a header", function()
    -- The first bytes of a real 2.15 bzImage's header, 0x1f1..0x26b.
    local hex = "27010020820d000000ffff000055aaeb6a486472530f02000000000010c0" ..
      "420001008000001000000000000000000000000000e05b000000000000ff" ..
      "ffff7f0000200001157f00ff070000000000000000000000000000cc0200" ..
      "00cc96d6000000000000000000000000010000000000803703102fd7001c" ..
      "f9d700"
    local bytes = string.rep("\0", 0x1f1) .. hex:gsub("..", function(h) return string.char(tonumber(h, 16)) end)
    local hdr, info = assert(bp.read_setup_header(bytes))
    assert.are.equal(0x26c, #bytes)
    assert.are.equal(0x26c, info.header_end)
    assert.are.equal(0x27, hdr.setup_sects)
    assert.are.equal(0xd8220, hdr.syssize)
    assert.are.equal(0xffff, hdr.vid_mode)
    assert.are.equal(0xaa55, hdr.boot_flag)
    assert.are.equal(0x1000, hdr.start_sys_seg)
    assert.are.equal(0x42c0, hdr.kernel_version)
    assert.are.equal(0x8000, hdr.setup_move_size)
    assert.are.equal(0x100000, hdr.code32_start)
    assert.are.equal(0x5be0, hdr.heap_end_ptr)
    assert.are.equal(0x15, hdr.min_alignment)
    assert.are.equal(0x2cc, hdr.payload_offset)
    assert.are.equal(0xd696cc, hdr.payload_length)
    assert.are.equal(0xd72f10, hdr.handover_offset)
    assert.are.equal(0xd7f91c, hdr.kernel_info_offset)
  end)

  it("reads setup_sects 0 as 4", function()
    local _, info = bp.read_setup_header(image{ setup_sects = 0 })
    assert.are.equal(4, info.setup_sects)
    assert.are.equal(5 * 512, info.kernel_offset)
  end)

  it("leaves out fields beyond the header's end", function()
    -- 2.12: the header ends at 0x202 + 0x62 = 0x264 (no handover_offset, kernel_info_offset)
    local hdr, info = bp.read_setup_header(image{ version = 0x020c, jump = 0x62eb, len = 0x264 })
    assert.are.equal(0x264, info.header_end)
    assert.are.equal("2.12", info.version)
    assert.are.equal(0x3378000, hdr.init_size)
    assert.is_nil(hdr.handover_offset)
    assert.is_nil(hdr.kernel_info_offset)
    -- and pack takes the result
    assert.are.equal(0x3378000, u("<I4", bp.pack{ hdr = hdr }, 0x260))
  end)

  local bad = {
    { "a short file", image{ len = 0x205 }, "not a bzImage (517 bytes, too short for a setup header)" },
    { "no magic", image{ header = 0x12345678 }, "not a bzImage (no HdrS magic)" },
    { "an old protocol", image{ version = 0x020a }, "boot protocol 2.10 too old (need 2.12)" },
    { "a 2.02 protocol", image{ version = 0x0202 }, "boot protocol 2.02 too old (need 2.12)" },
    { "a truncated header", image{ len = 0x240 }, "truncated bzImage header (need 0x26c bytes, got 0x240)" },
    { "a 32-bit kernel", image{ xloadflags = 0x2 }, "kernel has no 64-bit entry point (XLF_KERNEL_64 not set)" },
    { "a header too short for xloadflags", image{ jump = 0x30eb },
      "kernel has no 64-bit entry point (XLF_KERNEL_64 not set)" },
  }
  for _, c in ipairs(bad) do
    it("returns nil, msg for " .. c[1], function()
      local hdr, err = bp.read_setup_header(c[2])
      assert.is_nil(hdr)
      assert.are.equal(c[3], err)
    end)
  end

  it("raises on a non-string", function()
    assert.has_error(function() bp.read_setup_header(42) end,
      "bootparams.read_setup_header: expected a string, got number")
  end)

  local kernel = "guest-kernel/bzImage"
  local f = io.open(kernel, "rb")
  if f then
    it("reads " .. kernel, function()
      local hdr, info = assert(bp.read_setup_header(f:read(1024)))
      f:close()
      assert.are.equal(bp.HDRS_MAGIC, hdr.header)
      assert.is_true(info.kernel_offset >= 5 * 512)
      assert.are_not.equal(0, hdr.xloadflags & bp.XLF_KERNEL_64)
    end)
  else
    pending(kernel .. " not present")
  end
end)

describe("kvm.bootparams.split64", function()
  it("splits unsigned 64-bit values", function()
    assert.are.same({ 0x81000000, 0xffffffff }, { bp.split64(0xffffffff81000000) })
    assert.are.same({ 0x20000, 0 }, { bp.split64(0x20000) })
    assert.are.same({ 0, 1 }, { bp.split64(1 << 32) })
  end)
  it("raises on a non-integer", function()
    assert.has_error(function() bp.split64("1") end, "bootparams.split64: expected an integer, got string")
  end)
end)
