--- Snapshot files built by hand (the format of csrc/snapfile.c, version 1),
-- for spec/core/snapfile_spec.lua and the fuzz seeds (spec/fuzz/make_corpus.lua):
-- good ones, and ones with a field chosen to be wrong but every checksum
-- right, so that a check other than the checksum has to refuse them.
--
--     local build = require "snapfile_build"
--     local bytes, at = build.file{ parts = { build.vcpu(0) }, mem = { { size = 0x10000, pages = { [0] = "x" } } } }
local build = {}

local T = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do c = (c & 1 == 1) and ((c >> 1) ~ 0x82f63b78) or (c >> 1) end
  T[i] = c
end

--- CRC32C (Castagnoli) of a string.
function build.crc32c(s)
  local c = 0xffffffff
  for i = 1, #s do c = T[(c ~ s:byte(i)) & 0xff] ~ (c >> 8) end
  return c ~ 0xffffffff
end

build.MAGIC = "LKVMSNAP"
build.VERSION = 1
build.HDR_LEN = 96
build.SEC_LEN = 64
build.KIND = { vm = 1, vcpu = 2, device = 3, memory = 16, meta = 17, END = 255 }
build.R_CPUID = 11               -- SNAP_R_CPUID (csrc/snapshot.h)
build.R_REGS = 2                 -- SNAP_R_REGS
build.PAGE = 4096

-- the header's feature words: {leaf, subleaf, register}
build.WORDS = {
  { 1, 0, "ecx" }, { 1, 0, "edx" }, { 7, 0, "ebx" }, { 7, 0, "ecx" }, { 7, 0, "edx" },
  { 7, 1, "eax" }, { 0xd, 0, "eax" }, { 0xd, 0, "edx" }, { 0xd, 1, "eax" },
  { 0x80000001, 0, "ecx" }, { 0x80000001, 0, "edx" },
}

local function find(entries, func, index)
  for _, e in ipairs(entries) do
    if e.func == func and e.index == index then return e end
  end
end
build.find = find

--- This host's CPU vendor (12 bytes) and feature words, as its KVM reports
-- them (kvm.supported_cpuid()): what a file saved here has in its header.
-- (asked once: KVM's CPUID.1:EBX has the APIC id of the host CPU the
-- ioctl ran on, so two calls may differ there)
local host_entries
function build.host()
  local kvm = require "kvm"
  host_entries = host_entries or assert(kvm.supported_cpuid())
  local entries = host_entries
  local l0 = find(entries, 0, 0)
  local vendor = string.pack("<I4I4I4", l0.ebx, l0.edx, l0.ecx)
  local words = {}
  for i, w in ipairs(build.WORDS) do
    local e = find(entries, w[1], w[2])
    words[i] = e and e[w[3]] or 0
  end
  return vendor, words, entries
end

--- A record of a VM or vCPU part: u32 tag, u32 length, the bytes.
function build.record(tag, bytes)
  return string.pack("<I4I4", tag, #bytes) .. bytes
end

--- CPUID entries (tables as kvm.supported_cpuid() gives) as a record's
-- payload: struct kvm_cpuid_entry2[] (40 bytes each).
function build.cpuid(entries)
  local t = {}
  for i, e in ipairs(entries) do
    t[i] = string.pack("<I4I4I4I4I4I4I4I4I4I4", e.func, e.index, e.flags or 0, e.eax, e.ebx,
                       e.ecx, e.edx, 0, 0, 0)
  end
  return table.concat(t)
end

--- A vCPU part: a REGS-like record and a CPUID record (entries, default
-- this host's supported CPUID).
function build.vcpu(id, entries)
  if not entries then entries = select(3, build.host()) end
  return { kind = build.KIND.vcpu, id = id,
           data = build.record(build.R_REGS, ("r"):rep(144)) .. build.record(build.R_CPUID, build.cpuid(entries)) }
end

local function section(kind, id, name, addr, payload, o)
  o = o or {}
  local h = string.pack("<I4I4c32I8I8I4", kind, id, name, addr, o.len or #payload,
                        o.crc or build.crc32c(payload))
  h = h .. string.pack("<I4", o.hdr_crc or build.crc32c(h))
  return h .. payload
end

--- A memory section's payload. m: slot, flags, guest, size, pages = {[page
-- index] = bytes (padded to 4096 with zeroes)}; overrides: stored (the
-- head's count), bitmap (raw), data (raw pages).
function build.memory(m)
  local npages = m.size // build.PAGE
  local idx = {}
  for i in pairs(m.pages or {}) do idx[#idx + 1] = i end
  table.sort(idx)
  local words, data = {}, {}
  for _, i in ipairs(idx) do
    words[i // 64] = (words[i // 64] or 0) | (1 << (i % 64))
    local p = m.pages[i]
    data[#data + 1] = p .. ("\0"):rep(build.PAGE - #p)
  end
  local bitmap = m.bitmap
  if not bitmap then
    local t = {}
    for w = 0, (npages + 63) // 64 - 1 do t[#t + 1] = string.pack("<I8", words[w] or 0) end
    bitmap = table.concat(t)
  end
  return string.pack("<I4I4I8I8I8", m.slot or 0, m.flags or 0, m.guest or 0, m.size, m.stored or #idx)
    .. bitmap .. (m.data or table.concat(data))
end

--- A snapshot file's bytes, and where each section starts (at[k] = its
-- offset, 0-based, k = 1.. ; at.END).
-- t: parts = { {kind=, id=, name=, addr=, data=, len=, crc=, hdr_crc=} },
-- meta, mem = { memory tables (build.memory), each with len=, crc= overrides
-- too }; header overrides: magic, version, hdr_len, flags, file_len,
-- sections, vendor, words.
function build.file(t)
  local vendor, words = t.vendor, t.words
  if not vendor or not words then
    local v, w = build.host()
    vendor, words = vendor or v, words or w
  end
  local secs = {}
  for _, p in ipairs(t.parts or {}) do
    secs[#secs + 1] = section(p.kind, p.id or 0, p.name or "", p.addr or 0, p.data or "", p)
  end
  if t.meta then secs[#secs + 1] = section(build.KIND.meta, 0, "", 0, t.meta) end
  for _, m in ipairs(t.mem or {}) do
    secs[#secs + 1] = section(build.KIND.memory, 0, "", 0, build.memory(m), m)
  end
  local n = #secs
  secs[#secs + 1] = section(build.KIND.END, t.end_id or n, "", 0, "")
  local body = table.concat(secs)
  local h = build.MAGIC
  if t.magic then h = t.magic end
  local hdr = string.pack("<c8I4I4I4I4I8I4I4c12", h, t.version or build.VERSION, t.hdr_len or build.HDR_LEN,
                          t.flags or 0, 0, t.file_len or (build.HDR_LEN + #body), t.sections or n, 0, vendor)
  for i = 1, 11 do hdr = hdr .. string.pack("<I4", words[i]) end
  local crc = build.crc32c(hdr)
  hdr = hdr:sub(1, 20) .. string.pack("<I4", t.hdr_crc or crc) .. hdr:sub(25)
  local at, off = {}, build.HDR_LEN
  for k, s in ipairs(secs) do
    at[k] = off
    off = off + #s
  end
  at.END = at[#secs]
  return hdr .. body, at
end

return build
