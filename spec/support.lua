--- Shared helpers for the specs (loaded with `require "support"`; spec/helper.lua
-- puts spec/ on package.path).
--
--     local support = require "support"
--     describe("thing", function()
--       it("runs", function()
--         support.need_kvm()
--         local vm, cpu, ram = support.guest("\xf4")   -- hlt
--         assert.equal("hlt", cpu:run().reason)
--       end)
--     end)
--
-- Guests are loaded at `support.BASE` (0x1000) with rip = 0x1000, rsp = 0x8000
-- and rflags = 2 (interrupts off) in a region of `support.RAM` bytes at 0.
local support = {}

--- Where guests are loaded and start.
support.BASE = 0x1000

--- Guest RAM size for `support.guest` (2 MiB: room for long mode's tables).
support.RAM = 2 << 20

local core_ok, kvm = pcall(require, "kvm")
local x86 = core_ok and require "kvm.x86" or nil

local ok_cache, why_cache

local function env_of(f)
  for i = 1, math.huge do
    local name, value = debug.getupvalue(f, i)
    if name == nil or name == "_ENV" then return value end
  end
end

-- busted's environment, where a spec's globals are (pending among them): the
-- _ENV of the spec requiring this module, the first caller whose _ENV is not _G
local spec_env
for level = 2, math.huge do
  local info = debug.getinfo(level, "f")
  if not info then break end
  local env = env_of(info.func)
  if env and env ~= _G then spec_env = env break end
end

--- Is KVM usable here (the core loads and /dev/kvm opens)?
-- @treturn boolean
-- @treturn ?string why not
function support.kvm_ok()
  if ok_cache == nil then
    if not core_ok then
      ok_cache, why_cache = false, "kvm.core does not load (run make): " .. tostring(kvm)
    else
      local ok, why = kvm.available()
      ok_cache, why_cache = ok, why
      if ok and not kvm.vm() then ok_cache, why_cache = false, select(2, kvm.vm()) end
    end
  end
  return ok_cache, why_cache
end

--- For a test that needs a VM, called first in its `it`: returns when KVM is
-- usable; otherwise fails the test with the reason, or with
-- LUAKVM_ALLOW_NO_KVM=1 marks it pending ("no KVM: why", counted apart in
-- the summary).
function support.need_kvm()
  local ok, why = support.kvm_ok()
  if ok then return end
  if os.getenv("LUAKVM_ALLOW_NO_KVM") == "1" and spec_env then
    spec_env.pending("no KVM: " .. why)
  end
  error("needs KVM, none usable here: " .. why .. " (LUAKVM_ALLOW_NO_KVM=1 skips)", 2)
end

--- fn when KVM is usable, else a function that does nothing: for the setup,
-- teardown, before_each and after_each that make or close VMs (their tests
-- call support.need_kvm).
function support.with_kvm(fn)
  if support.kvm_ok() then return fn end
  return function() end
end

--- Read a file's bytes.
--- Run a shell command: its output (stderr too) and exit status (0 = success).
function support.sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok and 0 or code
end

--- Can the file system holding `path` punch holes (what virtio-blk probes
-- before it offers DISCARD)? Asked of util-linux's fallocate(1), a hole past
-- the end of the file: nothing in it changes.
function support.punches_holes(path)
  local size = #support.slurp(path)
  local _, code = support.sh(("fallocate --punch-hole --keep-size --offset %d --length 512 '%s' 2>&1")
    :format(size, path))
  return code == 0
end

--- Does a file (or folder) open for reading?
function support.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

--- A whole file's bytes; when it cannot be opened, `missing` if given
-- (a file a child process has not written yet), else an error.
function support.slurp(path, missing)
  local f, why = io.open(path, "rb")
  if not f and missing ~= nil then return missing end
  f = assert(f, why)
  local s = f:read("a")
  f:close()
  return s
end

--- Pack an ELF64 file (little-endian unless data = 2).
-- t: class, data, machine, type, entry, phoff, phentsize, phnum (override
-- the header), segments = { {type=, flags=, paddr=, vaddr=, offset=,
-- filesz=, memsz=, align=, data=}, ... } (type defaults to PT_LOAD, vaddr to
-- paddr, filesz to #data, memsz to filesz, offset to where data is placed),
-- truncate = n (keep the first n bytes), align = payload alignment (default
-- 16; 1 packs the payloads right after the program headers).
-- @return the file's bytes
function support.make_elf(t)
  t = t or {}
  local segs = t.segments or {}
  local phoff = t.phoff or 64
  local body_at = 64 + 56 * #segs
  -- payloads follow the program headers, `align`-byte aligned
  local align = t.align or 16
  local payload, placed = {}, {}
  local at = (body_at + align - 1) & ~(align - 1)
  for i, s in ipairs(segs) do
    local data = s.data or ""
    placed[i] = at
    payload[#payload + 1] = { at = at, data = data }
    at = (at + #data + align - 1) & ~(align - 1)
  end
  local ehdr = string.pack("<c4BBBBBc7I2I2I4I8I8I8I4I2I2I2I2I2I2",
    "\x7fELF", t.class or 2, t.data or 1, 1, 0, 0, string.rep("\0", 7),
    t.type or 2, t.machine or 62, 1, t.entry or 0, phoff, 0, 0,
    64, t.phentsize or 56, t.phnum or #segs, 64, 0, 0)
  local phdrs = {}
  for i, s in ipairs(segs) do
    local filesz = s.filesz or #(s.data or "")
    phdrs[i] = string.pack("<I4I4I8I8I8I8I8I8",
      s.type or 1, s.flags or 5, s.offset or placed[i],
      s.vaddr or s.paddr or 0, s.paddr or 0, filesz, s.memsz or filesz,
      s.align or 16)
  end
  local parts = { ehdr, table.concat(phdrs) }
  local len = body_at
  for _, p in ipairs(payload) do
    parts[#parts + 1] = string.rep("\0", p.at - len)
    parts[#parts + 1] = p.data
    len = p.at + #p.data
  end
  local bytes = table.concat(parts)
  if t.truncate then bytes = bytes:sub(1, t.truncate) end
  return bytes
end

--- A bzImage for the Linux specs: one setup sector after the boot sector (a
-- 2.15 setup header, `over` changing its fields), then `payload` (the
-- protected-mode kernel; default 0x200 nops, `hlt` at the 64-bit entry, then
-- "K"s to 4 KiB).
-- @return the file's bytes
function support.make_bzimage(over, payload)
  local bootparams = require "kvm.bootparams"
  local hdr = { setup_sects = 1, boot_flag = 0xaa55, jump = 0x6aeb, header = bootparams.HDRS_MAGIC,
                version = 0x020f, loadflags = 1, initrd_addr_max = 0x7fffffff,
                kernel_alignment = 0x200000, relocatable_kernel = 1, xloadflags = 1,
                cmdline_size = 255, pref_address = 0x1000000, init_size = 0x20000 }
  for k, v in pairs(over or {}) do hdr[k] = v end
  payload = payload or support.BZIMAGE_PAYLOAD
  return bootparams.pack{ hdr = hdr }:sub(1, 1024) .. payload
end

--- make_bzimage's default payload.
support.BZIMAGE_PAYLOAD = ("\x90"):rep(0x200) .. "\xf4" .. ("K"):rep(4096 - 0x201)

--- Write bytes to a fresh temporary file; its path is appended to `keep`
-- (when given) for the spec's teardown to remove.
-- @return the path
function support.write_tmp(bytes, keep)
  local path = os.tmpname()
  if keep then keep[#keep + 1] = path end
  local f = assert(io.open(path, "wb"))
  f:write(bytes)
  f:close()
  return path
end

--- The bytes of spec/guest/NAME.bin (a flat binary `make` assembles from
-- spec/guest/NAME.S); raises when it has not been built.
function support.guest_bin(name)
  local path = "spec/guest/" .. name .. ".bin"
  local f = io.open(path, "rb")
  if not f then error(path .. " is missing: run `make` first", 2) end
  local s = f:read("a")
  f:close()
  return s
end

--- Real mode: out and in of widths 1, 2, 4 on `port`; what the ins read is
-- stored at 0x2000 (byte), 0x2002 (word), 0x2004 (dword).
function support.widths_guest(port)
  return "\xba" .. string.pack("<I2", port)  -- mov dx, port
      .. "\xb0\x12"                    -- mov al, 0x12
      .. "\xee"                        -- out dx, al
      .. "\xb8\x34\x12"                -- mov ax, 0x1234
      .. "\xef"                        -- out dx, ax
      .. "\x66\xb8\x78\x56\x34\x12"    -- mov eax, 0x12345678
      .. "\x66\xef"                    -- out dx, eax
      .. "\xec"                        -- in al, dx
      .. "\xa2\x00\x20"                -- mov [0x2000], al
      .. "\xed"                        -- in ax, dx
      .. "\xa3\x02\x20"                -- mov [0x2002], ax
      .. "\x66\xed"                    -- in eax, dx
      .. "\x66\xa3\x04\x20"            -- mov [0x2004], eax
      .. "\xf4"                        -- hlt
end

--- Create a VM with `support.RAM` bytes of memory at 0 and vCPU 0, load a
-- guest at 0x1000 and point rip at it.
-- @param code the guest: a byte string, or the name of a flat binary built
--   by make from spec/guest/NAME.S ("name.bin")
-- @tparam[opt] table opts `mode` = "real" (default: 16-bit, segments 0),
--   "protected" (flat 32-bit) or "long" (64-bit, identity-mapped 4 GiB);
--   `size` = RAM bytes; `regs` = extra registers for set_regs; `setup` =
--   function(vm) called before the vCPU is created (devices, irqchip)
-- @return vm, cpu, ram
function support.guest(code, opts)
  opts = opts or {}
  local name = code:match("^([%w_%-]+)%.bin$")
  if name then code = support.guest_bin(name) end
  local vm = assert(kvm.vm())
  local ram = vm:memory{ guest = 0, size = opts.size or support.RAM }
  if opts.setup then opts.setup(vm) end
  local cpu = assert(vm:vcpu(0))
  local mode = opts.mode or "real"
  if mode == "real" then x86.real_mode(cpu)
  elseif mode == "protected" then x86.protected_mode(cpu, vm)
  elseif mode == "long" then x86.long_mode(cpu, vm)
  else error("support.guest: unknown mode '" .. tostring(mode) .. "'", 2) end
  ram:write(support.BASE, code)
  local regs = { rip = support.BASE, rsp = 0x8000, rflags = 2 }
  for k, v in pairs(opts.regs or {}) do regs[k] = v end
  cpu:set_regs(regs)
  return vm, cpu, ram
end

--- A VM of `n` vCPUs with the SMP test guest (spec/guest/smp.S): an
-- in-kernel irqchip, each vCPU's CPUID with its APIC id, the BSP in flat
-- protected mode at 0x1000. `o.wait` = how many APs the BSP waits for
-- (default n - 1; more: it spins for good), `o.hammer` = how many times each
-- CPU writes its APIC id to port 0x12 first (default 0).
-- @return vm, cpus (a list, vCPU 0 first), ram
function support.smp_guest(n, o)
  o = o or {}
  local cpuid = require "kvm.cpuid"
  local vm = assert(kvm.vm())
  local ram = vm:memory{ guest = 0, size = support.RAM }
  assert(vm:irqchip())
  local cpus = {}
  for i = 0, n - 1 do
    local c = assert(vm:vcpu(i))
    assert(c:set_cpuid(assert(cpuid.guest{ apic_id = i })))
    cpus[i + 1] = c
  end
  x86.protected_mode(cpus[1], vm)
  ram:write(0x1000, support.guest_bin("smp"))
  ram:write(0x3004, string.pack("<I4I4", o.wait or n - 1, o.hammer or 0))
  cpus[1]:set_regs{ rip = 0x1000, rsp = 0x8000, rflags = 2 }
  return vm, cpus, ram
end

--- What a person types at a guest's console, step by step: a shell piping
-- into the serial input (`t.pipe`, the console's `input`) types each step's
-- `send` when told to (`t.go(i)`: a flag file), or at once for a step with
-- `at_once = true` (typed ahead, before the guest reads). `t.close()` lets the
-- rest go, closes the pipe and removes the files. With `into` (a shell
-- command: a VMM of its own, an example) the typing goes to that command's
-- standard input, and t.pipe reads its output.
function support.typist(steps, into)
  local files, script = {}, {}
  for i, step in ipairs(steps) do
    local text, flag = os.tmpname(), os.tmpname()
    os.remove(flag)
    local f = assert(io.open(text, "wb")); f:write(step.send); f:close()
    files[i] = { text = text, flag = flag }
    if not step.at_once then
      script[#script + 1] = ("while [ ! -e %s ]; do sleep 0.2; done"):format(flag)
    end
    script[#script + 1] = "cat " .. text
  end
  local pipe = assert(io.popen("sh -c '" .. table.concat(script, "; ") .. "'" .. (into and " | " .. into or ""), "r"))
  local t = { pipe = pipe }
  function t.go(i) local f = io.open(files[i].flag, "w"); if f then f:close() end end
  function t.close()
    for i = 1, #files do t.go(i) end
    pipe:close()
    for _, f in ipairs(files) do os.remove(f.text); os.remove(f.flag) end
  end
  return t
end

--- Call f(...) and return the error it raises, without the "file:line: "
-- position Lua adds in front; fails the test when it does not raise. (Call
-- methods inside a closure, not as a tail call, so that the message names
-- them: `support.err(function() vm:vcpu(-1) end)`.)
function support.err(f, ...)
  local ok, e = pcall(f, ...)
  if ok then error("expected an error, got none", 2) end
  if type(e) == "string" then e = e:gsub("^[%w_%./%-]+:%d+: ", "", 1) end
  return e
end

local callers = {}

--- The error obj:name(...) raises, as support.err gives it (the call is
-- made as a method call so the message names the method).
function support.merr(obj, name, ...)
  local f = callers[name]
  if not f then
    assert(name:match("^[%a_][%w_]*$"), "bad method name")
    f = assert(load("local o = ...; o:" .. name .. "(select(2, ...))", "=call"))
    callers[name] = f
  end
  return support.err(f, obj, ...)
end

--- This process's pid (the first field of /proc/self/stat).
function support.pid()
  local f = assert(io.open("/proc/self/stat"))
  local pid = f:read("n")
  f:close()
  return math.tointeger(pid)
end

--- How many file descriptors this process has open (entries of
-- /proc/PID/fd, listed by ls), pipes left out: the write end of the pipe to
-- ls may or may not be closed yet in this process when ls reads the list.
function support.fd_count()
  local p = assert(io.popen("ls -l /proc/" .. support.pid() .. "/fd"))
  local n = 0
  for line in p:lines() do
    local target = line:match(" %d+ %-> (.*)$")
    if target and not target:match("^pipe:") then n = n + 1 end
  end
  p:close()
  return n
end

--- Wall-clock seconds (from /proc/uptime, 10 ms resolution).
function support.now()
  local f = assert(io.open("/proc/uptime"))
  local t = f:read("n")
  f:close()
  return t
end

--- Full garbage collection, twice (finalizers run in the first).
function support.gc()
  collectgarbage()
  collectgarbage()
end

--- Run a Lua snippet in a child lua5.4 (for things that may crash the
-- process). Returns the exit status ("exit", code) as os.execute does, and
-- the child's stdout.
-- @param src the snippet
-- @tparam[opt] string wrap a command to run lua5.4 under ("strace -c -o F ")
function support.child(src, wrap)
  local name = os.tmpname()
  local f = assert(io.open(name, "w"))
  f:write('package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;" .. package.path\n',
          'package.cpath = "./?.so;" .. package.cpath\n', src)
  f:close()
  local p = assert(io.popen((wrap or "") .. "lua5.4 " .. name .. " 2>&1"))
  local out = p:read("a")
  local _, how, code = p:close()
  os.remove(name)
  return code, out, how
end

return support
