--- Bad files: truncated, corrupt and lying ELF and bzImage kernels, initrds
-- that do not fit, missing and unreadable files, through
-- `kvm.linux.setup{...}` and `vm:load_elf`. Every one gets nil and a clear
-- message, never a Lua error and never a crash, before the guest runs; and
-- a failed setup leaves no file descriptor behind.
--
-- Files are built here with string.pack and written to temporary files.
local support = require "support"

local MEM = 32 << 20

--- An ELF64 file (support.make_elf) with payloads packed right after the
-- program headers and the entry at 1 MiB unless given.
local function make_elf(t)
  t = t or {}
  local u = { align = 1, entry = 0x100000 }
  for k, v in pairs(t) do u[k] = v end
  return support.make_elf(u)
end

--- The smallest good kernel: one segment at 1 MiB, hlt.
local function good_elf(extra)
  local t = { segments = { { paddr = 0x100000, data = "\xf4" .. string.rep("\0", 63) } } }
  for k, v in pairs(extra or {}) do t[k] = v end
  return make_elf(t)
end

--- Set bytes of s at offset (0-based) to string.pack(fmt, ...).
local function poke(s, off, fmt, ...)
  local v = string.pack(fmt, ...)
  if #s < off + #v then s = s .. string.rep("\0", off + #v - #s) end
  return s:sub(1, off) .. v .. s:sub(off + #v + 1)
end

--- A bzImage: setup sectors with a 2.15 setup header, then `payload`.
-- t: setup_sects, jump (header length byte at 0x201), version, xloadflags,
-- cmdline_size, relocatable, pref_address, init_size, initrd_addr_max,
-- payload, truncate.
local function make_bzimage(t)
  t = t or {}
  local sects = t.setup_sects or 1
  local s = string.rep("\0", ((sects == 0 and 4 or sects) + 1) * 512)
  s = poke(s, 0x1f1, "<I1", sects)
  s = poke(s, 0x1fe, "<I2", 0xaa55)
  s = poke(s, 0x200, "<BB", 0xeb, t.jump or 0x6a)       -- header ends at 0x26c
  s = poke(s, 0x202, "c4", "HdrS")
  s = poke(s, 0x206, "<I2", t.version or 0x020f)
  s = poke(s, 0x211, "<I1", 0x01)                       -- LOADED_HIGH
  s = poke(s, 0x22c, "<I4", t.initrd_addr_max or 0x7fffffff)
  s = poke(s, 0x230, "<I4", 0x200000)
  s = poke(s, 0x234, "<I1", t.relocatable or 1)
  s = poke(s, 0x236, "<I2", t.xloadflags or 0x3)       -- KERNEL_64 | CAN_BE_LOADED_ABOVE_4G
  s = poke(s, 0x238, "<I4", t.cmdline_size or 2047)
  s = poke(s, 0x258, "<I8", t.pref_address or 0x1000000)
  s = poke(s, 0x260, "<I4", t.init_size or 0x100000)
  s = s .. (t.payload or string.rep("\xf4", 4096))
  if t.truncate then s = s:sub(1, t.truncate) end
  return s
end

local tmpfiles = {}

local function write_tmp(bytes) return support.write_tmp(bytes, tmpfiles) end

--- A sparse file of `size` bytes starting with `head`.
local function sparse_tmp(head, size)
  local path = write_tmp(head)
  local f = assert(io.open(path, "r+b"))
  f:seek("set", size - 1)
  f:write("\0")
  f:close()
  return path
end

--- This process's open fds and what they point at, one per line.
local function fds()
  local p = assert(io.popen("ls -l /proc/" .. support.pid() .. "/fd"))
  local t = {}
  for l in p:lines() do
    local fd, target = l:match(" (%d+) %-> (.*)$")
    -- the pipe to ls is new each time
    if fd and not target:match("^pipe:") then t[#t + 1] = fd .. " -> " .. target end
  end
  p:close()
  table.sort(t)
  return table.concat(t, "\n")
end

local function is_root()
  local p = io.popen("id -u")
  local id = p:read("l")
  p:close()
  return id == "0"
end

describe("bad kernel files #guest", function()
  local kvm = require "kvm"
  local linux = require "kvm.linux"

  after_each(function()
    for _, p in ipairs(tmpfiles) do os.remove(p) end
    tmpfiles = {}
    support.gc()
  end)

  --- linux.setup on a kernel (and initrd); asserts nil + a message matching
  -- `want` (plain text), no error raised, no fd left open
  local function refused(opts, want)
    support.gc()
    local before = fds()
    local o = { memory = MEM, output = function() end, profile = false }
    for k, v in pairs(opts) do o[k] = v end
    local okc, ctx, msg = pcall(linux.setup, o)
    assert.is_true(okc, "linux.setup raised: " .. tostring(ctx))
    if ctx then ctx.vm:close() end
    assert.is_nil(ctx, "a bad file was accepted")
    assert.is_string(msg)
    assert.matches(want, msg, 1, true)
    support.gc()
    assert.equal(before, fds())
    return msg
  end

  describe("the builders make good files", function()
    it("a good ELF sets up", function()
      support.need_kvm()
      local ctx = assert(linux.setup{ kernel = write_tmp(good_elf()), memory = MEM,
                                      output = function() end, profile = false })
      assert.equal("elf", ctx.kind)
      assert.equal(0x100000, ctx.entry)
      ctx.vm:close()
    end)

    it("a good bzImage sets up", function()
      support.need_kvm()
      local ctx = assert(linux.setup{ kernel = write_tmp(make_bzimage()), memory = MEM,
                                      output = function() end, profile = false })
      assert.equal("bzimage", ctx.kind)
      assert.equal(0x1000200, ctx.entry)
      ctx.vm:close()
    end)
  end)

  -- { name, file bytes (or a function returning a path), expected message }
  local ELF_CASES = {
    { "an empty file", "", "neither an ELF vmlinux nor a bzImage" },
    { "only the magic", "\x7fELF", "truncated ELF header (4 bytes)" },
    { "a header cut at 40 bytes", good_elf{ truncate = 40 }, "truncated ELF header (40 bytes)" },
    { "program headers cut off", good_elf{ truncate = 64 + 20 }, "truncated: program headers end at 0x78" },
    { "program headers past the end (e_phoff)", good_elf{ phoff = 0x100000 },
      "truncated: program headers end at 0x100038 past the end of the file" },
    { "e_phoff + table wrapping around", good_elf{ phoff = -0x10 },
      "truncated: program headers (offset 0xfffffffffffffff0, 1 entries) are past the end of the file" },
    { "a lying e_phnum (1000)", good_elf{ phnum = 1000 }, "truncated: program headers end at" },
    { "e_phnum = PN_XNUM without section 0", good_elf{ phnum = 0xffff }, "libelf:" },
    { "e_phentsize 32", good_elf{ phentsize = 32 }, "program header size 32, not 56" },
    { "no program headers", make_elf{}, "no program headers" },
    { "no loadable segment", make_elf{ segments = { { type = 4, data = "note" } } }, "no loadable segments" },
    { "segment data past the end", make_elf{ segments = { { paddr = 0x100000, offset = 0x10000, filesz = 16 } } },
      "truncated: segment 0 ends at 0x10010 past the end of the file" },
    { "segment offset + size wrapping", make_elf{ segments = { { paddr = 0x100000, offset = -8, filesz = 16 } } },
      "truncated: segment 0 (offset 0xfffffffffffffff8 + size 0x10) is past the end of the file" },
    { "huge p_memsz (2^41)", make_elf{ segments = { { paddr = 0x100000, data = "x", memsz = 1 << 41 } } },
      "segment 0: memory size 0x20000000000 is too large" },
    { "p_memsz past the end of RAM", make_elf{ segments = { { paddr = 0x100000, data = "x", memsz = MEM } } },
      "segment 0 (0x100000-0x2100000) is outside guest memory" },
    { "p_memsz of 2^64-1", make_elf{ segments = { { paddr = 0x100000, data = "x", memsz = -1 } } },
      "segment 0: memory size 0xffffffffffffffff is too large" },
    { "p_filesz larger than p_memsz", make_elf{ segments = { { paddr = 0x100000, data = "xyz", memsz = 1 } } },
      "segment 0: file size 0x3 is larger than memory size 0x1" },
    { "a segment wrapping the address space", make_elf{ segments = { { paddr = -0x1000, data = "x", memsz = 0x2000 } } },
      "segment 0 (0xfffffffffffff000 + 0x2000) wraps around the address space" },
    { "a segment in no RAM", make_elf{ segments = { { paddr = 0xf0000000, data = "x" } } },
      "segment 0 (0xf0000000-0xf0000001) is outside guest memory" },
    { "overlapping segments", make_elf{ segments = { { paddr = 0x100000, data = "abcd", memsz = 0x1000 },
                                                    { paddr = 0x100800, data = "efgh" } } },
      "segments 0 and 1 overlap" },
    { "identical segments", make_elf{ segments = { { paddr = 0x100000, data = "abcd" }, { paddr = 0x100000, data = "abcd" } } },
      "segments 0 and 1 overlap" },
    { "wrong machine (AArch64)", good_elf{ machine = 183 }, "ELF64 for machine 183, not x86-64" },
    { "32-bit class", good_elf{ class = 1 }, "32-bit ELF, not ELF64" },
    { "a bad class", good_elf{ class = 7 }, "bad ELF class 7" },
    { "big-endian", good_elf{ data = 2 }, "big-endian ELF, not little-endian" },
    { "a bad data encoding", good_elf{ data = 0 }, "bad ELF data encoding 0" },
    { "a relocatable object", good_elf{ type = 1 }, "ELF type 1 (relocatable), not an executable" },
    { "a core file", good_elf{ type = 4 }, "ELF type 4 (core file), not an executable" },
    { "a kernel over the boot data (gdt at 0x500)", make_elf{ segments = { { paddr = 0, data = "x", memsz = 0x1000 } } },
      "layout: kernel (0x0-0xfff) overlaps gdt" },
  }

  describe("ELF through linux.setup", function()
    for _, c in ipairs(ELF_CASES) do
      it(c[1] .. ": nil, '" .. c[3] .. "'", function()
        -- only the prober's case is refused before a VM exists (vm:load_elf checks an ELF)
        if not c[3]:match("^neither") then support.need_kvm() end
        local path = write_tmp(c[2])
        local msg = refused({ kernel = path }, c[3])
        -- a file's problem names the file (the layout's names the range)
        if not c[3]:match("^layout") then
          assert.equal(1, select(2, msg:gsub(path, "")), "message names the file once: " .. msg)
        end
      end)
    end
  end)

  describe("ELF through vm:load_elf", function()
    local vm
    before_each(support.with_kvm(function()
      vm = assert(kvm.vm())
      vm:memory{ guest = 0, size = MEM }
    end))
    after_each(support.with_kvm(function() vm:close() end))

    for _, c in ipairs(ELF_CASES) do
      -- the first case is the prober's, the last is the layout's
      if not c[3]:match("^neither") and not c[3]:match("^layout") then
        it(c[1] .. ": nil, 'path: " .. c[3] .. "', memory untouched", function()
          support.need_kvm()
          vm:write(0x100000, "\xaa\xbb")
          local path = write_tmp(c[2])
          local r, msg, en = vm:load_elf(path)
          assert.is_nil(r)
          assert.matches(path .. ": ", msg, 1, true)
          assert.matches(c[3], msg, 1, true)
          assert.is_nil(en)
          assert.equal("\xaa\xbb", vm:read(0x100000, 2))
        end)
      end
    end

    it("an ELF cut at every length: each prefix is refused, the whole file loads", function()
      support.need_kvm()
      local bytes = good_elf()
      local refusedn = 0
      for n = 0, #bytes - 1 do
        local r, msg = vm:load_elf(write_tmp(bytes:sub(1, n)))
        assert.is_nil(r, "prefix of " .. n .. " bytes accepted")
        assert.is_string(msg)
        refusedn = refusedn + 1
        os.remove(tmpfiles[#tmpfiles]); tmpfiles[#tmpfiles] = nil
      end
      assert.equal(#bytes, refusedn)
      assert.is_table(vm:load_elf(write_tmp(bytes)))
    end)

    it("every single byte of the headers set to 0xff: a table or nil + message, never a crash", function()
      support.need_kvm()
      local bytes = good_elf()
      local loaded, refusedn = 0, 0
      for i = 1, 64 + 56 do
        local b = bytes:sub(1, i - 1) .. "\xff" .. bytes:sub(i + 1)
        local r, msg = vm:load_elf(write_tmp(b))
        if r then loaded = loaded + 1 else assert.is_string(msg); refusedn = refusedn + 1 end
        os.remove(tmpfiles[#tmpfiles]); tmpfiles[#tmpfiles] = nil
      end
      assert.equal(120, loaded + refusedn)
      assert.is_true(refusedn > 30)
    end)
  end)

  describe("ELF bigger than RAM", function()
    it("a 48 MiB (sparse) vmlinux for 32 MiB of RAM: refused before the VM is made", function()
      local path = sparse_tmp(good_elf(), 48 << 20)
      refused({ kernel = path }, "kernel file (48 MiB) is bigger than RAM (32 MiB)")
    end)
  end)

  describe("bzImage through linux.setup", function()
    local cmdlen = #linux.DEFAULT_CMDLINE
    local BZ_CASES = {
      { "setup_sects pointing past the end", make_bzimage{ setup_sects = 200, truncate = 0x1000 },
        "bzImage has no protected-mode kernel" },
      { "setup_sects = 0 (read as 4) on a 2 KiB file", make_bzimage{ setup_sects = 0, truncate = 0x800 },
        "bzImage has no protected-mode kernel" },
      { "cmdline_size 0", make_bzimage{ cmdline_size = 0 },
        ("command line is %d bytes, the kernel accepts at most 0"):format(cmdlen) },
      { "cmdline_size 10", make_bzimage{ cmdline_size = 10 },
        ("command line is %d bytes, the kernel accepts at most 10"):format(cmdlen) },
      { "a header cut before the version", make_bzimage{ truncate = 0x207 }, "truncated bzImage header (no version)" },
      { "a header cut in the middle", make_bzimage{ truncate = 0x240 },
        "truncated bzImage header (need 0x26c bytes, got 0x240)" },
      { "boot protocol 2.00", make_bzimage{ version = 0x0200 }, "boot protocol 2.00 too old (need 2.12)" },
      { "no 64-bit entry point", make_bzimage{ xloadflags = 0 }, "kernel has no 64-bit entry point (XLF_KERNEL_64 not set)" },
      { "a header too short to hold xloadflags", make_bzimage{ jump = 0x30 },
        "kernel has no 64-bit entry point (XLF_KERNEL_64 not set)" },
      { "init_size of 4 GiB - 1", make_bzimage{ init_size = 0xffffffff },
        "kernel needs 0x1000000-0x100fffffe (init_size), more than the 32 MiB of RAM" },
      { "pref_address past the end of RAM", make_bzimage{ pref_address = 0x40000000 },
        "kernel needs 0x40000000-0x400fffff (init_size), more than the 32 MiB of RAM" },
      { "pref_address wrapping around", make_bzimage{ pref_address = -0x1000 },
        "layout: kernel (0xfffffffffffff000-0xfefff) is outside guest RAM" },  -- the end wraps
      { "a non-relocatable kernel over the boot data", make_bzimage{ relocatable = 0, init_size = 0x10000 },
        nil },   -- 0x100000 is free: accepted (a control)
      { "HdrS without the rest", ("\0"):rep(0x202) .. "HdrS", "truncated bzImage header (no version)" },
      { "MZ and garbage", "MZ" .. ("\x55"):rep(0x3000), "neither an ELF vmlinux nor a bzImage" },
    }
    for _, c in ipairs(BZ_CASES) do
      if c[3] then
        it(c[1] .. ": nil, '" .. c[3] .. "'", function()
          refused({ kernel = write_tmp(c[2]) }, c[3])
        end)
      else
        it(c[1] .. ": accepted", function()
          support.need_kvm()
          local ctx = assert(linux.setup{ kernel = write_tmp(c[2]), memory = MEM,
                                          output = function() end, profile = false })
          ctx.vm:close()
        end)
      end
    end

    it("a bzImage cut at every length up to its kernel (0x400): nil + message, never a raise", function()
      local bytes = make_bzimage()
      for n = 0, 0x400 do
        local path = write_tmp(bytes:sub(1, n))
        local okc, ctx, msg = pcall(linux.setup, { kernel = path, memory = MEM, profile = false,
                                                  output = function() end })
        assert.is_true(okc, "setup raised at " .. n .. ": " .. tostring(ctx))
        if ctx then ctx.vm:close() end
        assert.is_nil(ctx, "cut at " .. n .. " accepted")
        assert.is_string(msg)
        os.remove(path); tmpfiles[#tmpfiles] = nil
      end
    end)

    it("the command line checks also hold for an ELF (2047 bytes at most)", function()
      refused({ kernel = write_tmp(good_elf()), cmdline = ("x"):rep(2048) },
        "command line is 2048 bytes, the kernel accepts at most 2047")
    end)

    it("a command line with a NUL byte", function()
      refused({ kernel = write_tmp(good_elf()), cmdline = "console=ttyS0\0evil" },
        "command line contains a NUL byte")
    end)
  end)

  describe("initrd", function()
    it("bigger than RAM (a 64 MiB sparse file for 32 MiB)", function()
      local path = sparse_tmp("", 64 << 20)
      refused({ kernel = write_tmp(good_elf()), initrd = path },
        ("initrd (%d bytes) does not fit below 0x2000000"):format(64 << 20))
    end)

    it("bigger than the bzImage's initrd_addr_max", function()
      local path = sparse_tmp("", 2 << 20)
      refused({ kernel = write_tmp(make_bzimage{ initrd_addr_max = 0xfffff }), initrd = path },
        "does not fit below 0x100000")
    end)

    it("missing", function()
      refused({ kernel = write_tmp(good_elf()), initrd = "/nonexistent/initrd.img" },
        "/nonexistent/initrd.img: No such file or directory")
    end)

    it("a directory", function()
      refused({ kernel = write_tmp(good_elf()), initrd = "/tmp" }, "/tmp")
    end)
  end)

  describe("missing and unreadable files", function()
    it("a missing kernel", function()
      refused({ kernel = "/nonexistent/vmlinux" }, "/nonexistent/vmlinux: No such file or directory")
    end)

    it("a directory as the kernel", function()
      refused({ kernel = "/tmp" }, "/tmp")
    end)

    it("/dev/zero as the kernel", function()
      refused({ kernel = "/dev/zero" }, "neither an ELF vmlinux nor a bzImage")
    end)

    it("a directory and a device through vm:load_elf", function()
      support.need_kvm()
      local vm = assert(kvm.vm())
      vm:memory{ guest = 0, size = 1 << 20 }
      local r, msg = vm:load_elf("/tmp")
      assert.is_nil(r)
      assert.equal("/tmp: Is a directory", msg)
      r, msg = vm:load_elf("/dev/null")
      assert.is_nil(r)
      assert.equal("/dev/null: not a regular file", msg)
      vm:close()
    end)

    if is_root() then
      pending("an unreadable (chmod 000) kernel: skipped, running as root reads it anyway")
    else
      it("an unreadable (chmod 000) kernel", function()
        support.need_kvm()
        local path = write_tmp(good_elf())
        assert(os.execute("chmod 000 " .. path))
        refused({ kernel = path }, path .. ": Permission denied")
        local vm = assert(kvm.vm())
        vm:memory{ guest = 0, size = 2 << 20 }
        local r, msg, en = vm:load_elf(path)
        assert.is_nil(r)
        assert.equal(path .. ": Permission denied", msg)
        assert.equal(13, en)
        vm:close()
      end)
    end
  end)
end)
