--- The x86 Linux boot protocol's `struct boot_params` ("zero page") and
-- `struct setup_header`, as tables of named fields.
--
-- Field names, offsets and widths are those of the kernel's
-- `<asm/bootparam.h>`; spec/unit/bootparams_spec.lua checks every one of them
-- against the header with a compiled C program. All offsets are from the start
-- of `struct boot_params`; since the setup header sits at 0x1f1 both in the zero
-- page and in a bzImage file, the same offsets read a bzImage.
--
-- @usage
-- local bp = require "kvm.bootparams"
-- local hdr, info = assert(bp.read_setup_header(image_head))
-- hdr.type_of_loader = 0xff
-- hdr.cmd_line_ptr = 0x20000
-- local zero_page = bp.pack{ hdr = hdr, e820 = map:entries() }
-- @module kvm.bootparams

local e820 = require "kvm.e820"

local bootparams = {}

local fmt = string.format

--- Size of `struct boot_params`.
bootparams.SIZE = 4096
--- Offset of `struct setup_header` in `boot_params` (and in a bzImage).
bootparams.HDR_OFFSET = 0x1f1
--- Offset of `e820_table` and its capacity; each entry is {addr u64, size u64, type u32}.
bootparams.E820_OFFSET = 0x2d0
bootparams.E820_MAX = e820.MAX_ENTRIES
bootparams.E820_ENTRY_SIZE = 20
--- "HdrS", the setup header's magic at 0x202.
bootparams.HDRS_MAGIC = 0x53726448
--- Oldest boot protocol `read_setup_header` accepts: 2.12 (64-bit entry, xloadflags).
bootparams.MIN_VERSION = 0x020c

-- loadflags
bootparams.LOADED_HIGH = 0x01
bootparams.KASLR_FLAG = 0x02
bootparams.QUIET_FLAG = 0x20
bootparams.KEEP_SEGMENTS = 0x40
bootparams.CAN_USE_HEAP = 0x80
-- xloadflags
bootparams.XLF_KERNEL_64 = 0x01
bootparams.XLF_CAN_BE_LOADED_ABOVE_4G = 0x02
bootparams.XLF_EFI_HANDOVER_32 = 0x04
bootparams.XLF_EFI_HANDOVER_64 = 0x08
bootparams.XLF_EFI_KEXEC = 0x10
bootparams.XLF_5LEVEL = 0x20
bootparams.XLF_5LEVEL_ENABLED = 0x40
-- e820 entry types under the kernel's names (`E820_RAM` ...): kvm.e820's
-- constants (`e820.RAM` ...), their one home.
for _, name in ipairs{ "RAM", "RESERVED", "ACPI", "NVS", "UNUSABLE", "PMEM" } do
  bootparams["E820_" .. name] = e820[name]
end
-- setup_data types
bootparams.SETUP_NONE = 0
bootparams.SETUP_E820_EXT = 1
bootparams.SETUP_DTB = 2
bootparams.SETUP_PCI = 3
bootparams.SETUP_EFI = 4
bootparams.SETUP_RNG_SEED = 9
--- `type_of_loader` for a boot loader without an assigned id.
bootparams.LOADER_UNDEFINED = 0xff

--- Fields of `struct setup_header`: `{name, offset (from boot_params), format}`,
-- in order. The formats are `string.pack` formats, little-endian.
-- @table hdr_fields
-- @field i `{name, offset, format}`, for i = 1, 2, ... in offset order
bootparams.hdr_fields = {
  { "setup_sects",           0x1f1, "<I1" },
  { "root_flags",            0x1f2, "<I2" },
  { "syssize",               0x1f4, "<I4" },
  { "ram_size",              0x1f8, "<I2" },
  { "vid_mode",              0x1fa, "<I2" },
  { "root_dev",              0x1fc, "<I2" },
  { "boot_flag",             0x1fe, "<I2" },
  { "jump",                  0x200, "<I2" },
  { "header",                0x202, "<I4" },
  { "version",               0x206, "<I2" },
  { "realmode_swtch",        0x208, "<I4" },
  { "start_sys_seg",         0x20c, "<I2" },
  { "kernel_version",        0x20e, "<I2" },
  { "type_of_loader",        0x210, "<I1" },
  { "loadflags",             0x211, "<I1" },
  { "setup_move_size",       0x212, "<I2" },
  { "code32_start",          0x214, "<I4" },
  { "ramdisk_image",         0x218, "<I4" },
  { "ramdisk_size",          0x21c, "<I4" },
  { "bootsect_kludge",       0x220, "<I4" },
  { "heap_end_ptr",          0x224, "<I2" },
  { "ext_loader_ver",        0x226, "<I1" },
  { "ext_loader_type",       0x227, "<I1" },
  { "cmd_line_ptr",          0x228, "<I4" },
  { "initrd_addr_max",       0x22c, "<I4" },
  { "kernel_alignment",      0x230, "<I4" },
  { "relocatable_kernel",    0x234, "<I1" },
  { "min_alignment",         0x235, "<I1" },
  { "xloadflags",            0x236, "<I2" },
  { "cmdline_size",          0x238, "<I4" },
  { "hardware_subarch",      0x23c, "<I4" },
  { "hardware_subarch_data", 0x240, "<I8" },
  { "payload_offset",        0x248, "<I4" },
  { "payload_length",        0x24c, "<I4" },
  { "setup_data",            0x250, "<I8" },
  { "pref_address",          0x258, "<I8" },
  { "init_size",             0x260, "<I4" },
  { "handover_offset",       0x264, "<I4" },
  { "kernel_info_offset",    0x268, "<I4" },
}

--- Top-level fields of `struct boot_params` a loader sets (`{name, offset,
-- format}`); the setup header (`hdr`) and `e820_table` are handled apart, and
-- `e820_entries` (0x1e8) is derived from the e820 list.
-- @table fields
-- @field i `{name, offset, format}`, for i = 1, 2, ... in offset order
bootparams.fields = {
  { "tboot_addr",              0x058, "<I8" },
  { "acpi_rsdp_addr",          0x070, "<I8" },
  { "ext_ramdisk_image",       0x0c0, "<I4" },
  { "ext_ramdisk_size",        0x0c4, "<I4" },
  { "ext_cmd_line_ptr",        0x0c8, "<I4" },
  { "cc_blob_address",         0x13c, "<I4" },
  { "alt_mem_k",               0x1e0, "<I4" },
  { "scratch",                 0x1e4, "<I4" },
  { "eddbuf_entries",          0x1e9, "<I1" },
  { "edd_mbr_sig_buf_entries", 0x1ea, "<I1" },
  { "kbd_status",              0x1eb, "<I1" },
  { "secure_boot",             0x1ec, "<I1" },
  { "sentinel",                0x1ef, "<I1" },
}

--- Offset of `e820_entries` (a u8) in `boot_params`.
bootparams.E820_ENTRIES_OFFSET = 0x1e8

local hdr_by_name, top_by_name = {}, {}
for _, f in ipairs(bootparams.hdr_fields) do hdr_by_name[f[1]] = f end
for _, f in ipairs(bootparams.fields) do top_by_name[f[1]] = f end

local function width(format) return string.packsize(format) end

-- Check that v fits the field; returns an error message or nil.
local function check_value(where, name, format, v)
  if math.type(v) ~= "integer" then
    return fmt("%s%s: expected an integer, got %s", where, name, math.type(v) or type(v))
  end
  local w = width(format)
  if w < 8 and (v < 0 or v >= (1 << (8 * w))) then
    return fmt("%s%s: 0x%x does not fit in u%d", where, name, v, 8 * w)
  end
  return nil
end

-- Write `bytes` at `offset` into the array-of-pieces buffer.
local function put(buf, offset, bytes)
  for i = 1, #bytes do buf[offset + i] = bytes:byte(i) end
end

local function e820_list(map)
  if type(map) == "table" or type(map) == "userdata" then
    local mt = getmetatable(map)
    if mt and type(map.entries) == "function" then return map:entries() end
  end
  return map
end

--- Pack a zero page.
-- Fields not given are zero. `hdr` holds setup header fields by name (see
-- `hdr_fields`); `e820` is a list of `{addr=, size=, type=}` (or an object with
-- an `entries()` method, like a `kvm.e820` map) and sets `e820_entries`; the
-- other keys are the fields in `fields`. `e820_entries` may be given only if it
-- equals `#e820`.
-- @tparam table t `{hdr = {...}, e820 = {...}, ext_cmd_line_ptr = ..., ...}`
-- @treturn string 4096 bytes
-- @raise on an unknown field, a non-integer, a value too wide for its field,
--   or more than 128 e820 entries
function bootparams.pack(t)
  if type(t) ~= "table" then
    error("bootparams.pack: expected a table, got " .. type(t), 2)
  end
  local bytes = {}
  for i = 1, bootparams.SIZE do bytes[i] = 0 end
  for k, v in pairs(t) do
    if k == "hdr" then
      if type(v) ~= "table" then
        error("bootparams.pack: hdr must be a table, got " .. type(v), 2)
      end
      for hk, hv in pairs(v) do
        local f = hdr_by_name[hk]
        if not f then
          error(fmt("bootparams.pack: unknown setup_header field '%s'", tostring(hk)), 2)
        end
        local err = check_value("bootparams.pack: hdr.", hk, f[3], hv)
        if err then error(err, 2) end
        put(bytes, f[2], string.pack(f[3], hv))
      end
    elseif k ~= "e820" and k ~= "e820_entries" then -- those two are handled below
      local f = top_by_name[k]
      if not f then
        error(fmt("bootparams.pack: unknown boot_params field '%s'", tostring(k)), 2)
      end
      local err = check_value("bootparams.pack: ", k, f[3], v)
      if err then error(err, 2) end
      put(bytes, f[2], string.pack(f[3], v))
    end
  end
  local list = e820_list(t.e820 or {})
  if type(list) ~= "table" then
    error("bootparams.pack: e820 must be a list of {addr=, size=, type=}, got " .. type(list), 2)
  end
  local n = #list
  if n > bootparams.E820_MAX then
    error(fmt("bootparams.pack: %d e820 entries (at most %d fit in the zero page)", n, bootparams.E820_MAX), 2)
  end
  if t.e820_entries ~= nil and t.e820_entries ~= n then
    error(fmt("bootparams.pack: e820_entries = %s but #e820 = %d", tostring(t.e820_entries), n), 2)
  end
  for i, e in ipairs(list) do
    if type(e) ~= "table" then
      error(fmt("bootparams.pack: e820[%d] must be a table, got %s", i, type(e)), 2)
    end
    local where = fmt("bootparams.pack: e820[%d].", i)
    for ek in pairs(e) do
      if ek ~= "addr" and ek ~= "size" and ek ~= "type" then
        error(fmt("bootparams.pack: e820[%d]: unknown field '%s'", i, tostring(ek)), 2)
      end
    end
    for _, spec in ipairs{ { "addr", "<I8" }, { "size", "<I8" }, { "type", "<I4" } } do
      local err = check_value(where, spec[1], spec[2], e[spec[1]])
      if err then error(err, 2) end
    end
    put(bytes, bootparams.E820_OFFSET + (i - 1) * bootparams.E820_ENTRY_SIZE,
      string.pack("<I8I8I4", e.addr, e.size, e.type))
  end
  bytes[bootparams.E820_ENTRIES_OFFSET + 1] = n
  -- string.char takes a bounded number of arguments: convert in chunks.
  local out = {}
  for i = 1, bootparams.SIZE, 256 do
    out[#out + 1] = string.char(table.unpack(bytes, i, i + 255))
  end
  return table.concat(out)
end

--- Unpack a zero page into the table shape `pack` takes.
-- Every field of `fields` and `hdr_fields` is present (zero or not); `e820`
-- holds the first `e820_entries` entries.
-- @tparam string bytes at least 4096 bytes (more are ignored)
-- @treturn table `{hdr = {...}, e820 = {{addr=, size=, type=}, ...}, ...}`
-- @return nil, message when `e820_entries` exceeds 128
-- @raise when `bytes` is not a string of at least 4096 bytes
function bootparams.unpack(bytes)
  if type(bytes) ~= "string" then
    error("bootparams.unpack: expected a string, got " .. type(bytes), 2)
  end
  if #bytes < bootparams.SIZE then
    error(fmt("bootparams.unpack: need %d bytes, got %d", bootparams.SIZE, #bytes), 2)
  end
  local t = { hdr = {}, e820 = {} }
  for _, f in ipairs(bootparams.fields) do
    t[f[1]] = string.unpack(f[3], bytes, f[2] + 1)
  end
  for _, f in ipairs(bootparams.hdr_fields) do
    t.hdr[f[1]] = string.unpack(f[3], bytes, f[2] + 1)
  end
  local n = bytes:byte(bootparams.E820_ENTRIES_OFFSET + 1)
  if n > bootparams.E820_MAX then
    return nil, fmt("e820_entries = %d exceeds %d", n, bootparams.E820_MAX)
  end
  for i = 1, n do
    local a, s, ty = string.unpack("<I8I8I4", bytes,
      bootparams.E820_OFFSET + (i - 1) * bootparams.E820_ENTRY_SIZE + 1)
    t.e820[i] = { addr = a, size = s, type = ty }
  end
  return t
end

--- Read the setup header from the start of a bzImage.
-- Checks the "HdrS" magic, a boot protocol version of at least 2.12 and
-- `XLF_KERNEL_64` in `xloadflags` (the 64-bit entry point). Fields that lie
-- beyond the header's end (`0x202 + byte at 0x201`, the rule of
-- Documentation/arch/x86/boot.rst) are left out (nil): older protocols lack them.
-- @tparam string bytes the first bytes of the image (at least the header: 1 KiB
--   is always enough)
-- @treturn table hdr, fields by name, ready to be changed and given to `pack`
-- @treturn table info: `setup_sects` (0 read as 4), `kernel_offset` (file offset
--   of the protected-mode kernel, `(setup_sects + 1) * 512`), `header_end`
--   (offset just past the header), `version` ("2.15"), `major`, `minor`
-- @return nil, message for a file that is not a bzImage, too old, or not 64-bit
-- @raise when `bytes` is not a string
function bootparams.read_setup_header(bytes)
  if type(bytes) ~= "string" then
    error("bootparams.read_setup_header: expected a string, got " .. type(bytes), 2)
  end
  if #bytes < 0x206 then
    return nil, fmt("not a bzImage (%d bytes, too short for a setup header)", #bytes)
  end
  if string.unpack("<I4", bytes, 0x202 + 1) ~= bootparams.HDRS_MAGIC then
    return nil, "not a bzImage (no HdrS magic)"
  end
  if #bytes < 0x208 then
    return nil, "truncated bzImage header (no version)"
  end
  local version = string.unpack("<I2", bytes, 0x206 + 1)
  local major, minor = version >> 8, version & 0xff
  if version < bootparams.MIN_VERSION then
    return nil, fmt("boot protocol %d.%02d too old (need 2.12)", major, minor)
  end
  local header_end = 0x202 + bytes:byte(0x201 + 1)
  if #bytes < header_end then
    return nil, fmt("truncated bzImage header (need 0x%x bytes, got 0x%x)", header_end, #bytes)
  end
  local hdr = {}
  for _, f in ipairs(bootparams.hdr_fields) do
    if f[2] + width(f[3]) <= header_end then
      hdr[f[1]] = string.unpack(f[3], bytes, f[2] + 1)
    end
  end
  if hdr.xloadflags == nil or hdr.xloadflags & bootparams.XLF_KERNEL_64 == 0 then
    return nil, "kernel has no 64-bit entry point (XLF_KERNEL_64 not set)"
  end
  local sects = hdr.setup_sects
  if sects == 0 then sects = 4 end
  return hdr, {
    setup_sects = sects,
    kernel_offset = (sects + 1) * 512,
    header_end = header_end,
    version = fmt("%d.%02d", major, minor),
    major = major,
    minor = minor,
  }
end

--- Split a 64-bit value into its low and high 32 bits, for field pairs such as
-- `hdr.ramdisk_image` / `ext_ramdisk_image` and `hdr.cmd_line_ptr` / `ext_cmd_line_ptr`.
-- @tparam integer v the value (treated as unsigned)
-- @treturn integer low 32 bits
-- @treturn integer high 32 bits
function bootparams.split64(v)
  if math.type(v) ~= "integer" then
    error("bootparams.split64: expected an integer, got " .. (math.type(v) or type(v)), 2)
  end
  return v & 0xffffffff, (v >> 32) & 0xffffffff
end

return bootparams
