--- The examples in examples/, each run as its own process (`lua5.4
-- examples/X.lua`, from the checkout) with its output checked. The tiny-guest
-- examples take well under a second; the two that boot Linux are tagged e2e
-- (they run with the e2e suite) and are bounded by `timeout`.
local support = require "support"

local KERNEL = (os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel") .. "/vmlinux"

--- Run a command; returns its exit code and its output (stdout and stderr).
local function run(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local _, _, code = p:close()
  return code, out
end

local exists = support.exists

local function lines_matching(text, pattern)
  local n = 0
  for line in text:gmatch("[^\n]+") do
    if line:find(pattern) then n = n + 1 end
  end
  return n
end

describe("examples #guest", function()
  it("hello.lua prints the guest's greeting and its hlt", function()
    support.need_kvm()
    local code, out = run("timeout 60 lua5.4 examples/hello.lua")
    assert.equal(0, code, out)
    assert.matches("^Hello, KVM!\nguest halted: hlt at rip=0x%x+\n$", out)
  end)

  it("bare_metal.lua assembles its guest, which computes fib(20) and a hash", function()
    support.need_kvm()
    local code, out = run("timeout 60 lua5.4 examples/bare_metal.lua")
    assert.equal(0, code, out)
    assert.matches("assembled %d+ bytes of guest code", out)
    assert.matches("debug exit: code 109 (0x6d)", out, 1, true)
    assert.matches("fib(20) = 6765 (rax), expected 6765", out, 1, true)
    assert.matches('fnv1a64("Hello from bare metal!") = 0x78d75e4d365188bb (rbx), expected 0x78d75e4d365188bb',
      out, 1, true)
    assert.matches("\nok\n$", out)
  end)

  it("port_device.lua: random numbers from Lua, three timer interrupts through the PIC", function()
    support.need_kvm()
    local code, out = run("timeout 60 lua5.4 examples/port_device.lua")
    assert.equal(0, code, out)
    assert.equal(3, lines_matching(out, "^timer: armed for 20 ms, IRQ 5 raised after [%d.]+ ms$"), out)
    -- math.randomseed(42): the same numbers on every Lua 5.4
    assert.matches("rng: the guest read 0x660276e5 0x9b785431 0xa3bfbd4b 0x09025d55", out, 1, true)
    assert.matches("guest done: debug exit code 3 (interrupts seen), hlt wake-ups 3", out, 1, true)
    assert.matches("claims: 0x501 debug_exit (1 hit), 0x5f0-0x5f3 lua (4 hits), 0x5f8-0x5f9 lua (6 hits)",
      out, 1, true)
    assert.matches("\nok\n$", out)
  end)

  it("port_device.lua --seed gives other numbers", function()
    support.need_kvm()
    local code, out = run("timeout 60 lua5.4 examples/port_device.lua --seed 7")
    assert.equal(0, code, out)
    assert.matches("rng: the guest read 0x%x+ 0x%x+ 0x%x+ 0x%x+\n", out)
    assert.not_matches("0x660276e5", out, 1, true)
  end)

  it("boot_linux.lua, trace_io.lua and memory_layout.lua explain their usage", function()
    local code, out = run("lua5.4 examples/boot_linux.lua --help 2>/dev/null")
    assert.equal(0, code, out)
    assert.matches("usage: lua5.4 examples/boot_linux.lua KERNEL", out, 1, true)
    for _, o in ipairs{ "--initrd FILE", "--mem SIZE", "--cmdline", "--append", "--timeout SECONDS",
                        "--status", "--gdb HOST:PORT", "--gdb-wait", "--save-at TEXT FILE",
                        "--restore FILE", "-h, --help", "--version",
                        "124  --timeout ran out", "137  gdb killed the guest" } do
      assert.matches("\n  " .. o, out, 1, true)
    end
    code, out = run("lua5.4 examples/boot_linux.lua --version 2>/dev/null")
    assert.equal(0, code, out)
    assert.matches("^boot_linux %(luakvm%) %d", out)
    -- bad usage: exit 2 and a message naming the problem
    for _, case in ipairs{
      { "examples/boot_linux.lua --mem lots vmlinux", "boot_linux: --mem: a size like 256M expected" },
      { "examples/boot_linux.lua --mem 3 vmlinux", "boot_linux: --mem: 16M or more, a multiple of 2M expected" },
      { "examples/boot_linux.lua --bogus vmlinux",
        "boot_linux: unknown option --bogus (try: lua5.4 examples/boot_linux.lua --help)" },
      { "examples/boot_linux.lua --gdb 1234 vmlinux", "boot_linux: --gdb: HOST:PORT expected (like 127.0.0.1:1234)" },
      { "examples/boot_linux.lua --gdb-wait vmlinux", "boot_linux: --gdb-wait needs --gdb HOST:PORT" },
      { "examples/boot_linux.lua vmlinux --save-at prompt", "boot_linux: --save-at needs two values" },
      { "examples/boot_linux.lua vmlinux --save-at '' f", "boot_linux: --save-at: the text to wait for is empty" },
      { "examples/boot_linux.lua vmlinux --restore f", "boot_linux: --restore FILE takes no KERNEL" },
      { "examples/boot_linux.lua --restore f --cpus 2", "boot_linux: --restore FILE takes no --cpus" },
      { "examples/trace_io.lua --bogus", "trace_io: unknown option --bogus" },
      { "examples/memory_layout.lua --timeout",
        "memory_layout: --timeout needs a value\nusage: lua5.4 examples/memory_layout.lua" },
    } do
      code, out = run("lua5.4 " .. case[1])
      assert.equal(2, code, out)
      assert.matches(case[2], out, 1, true)
    end
  end)
end)

describe("examples that boot Linux #e2e", function()
  if not exists(KERNEL) then pending("no " .. KERNEL .. ": run make kernel") return end

  it("memory_layout.lua: two slots around a hole, the kernel's e820 matches", function()
    support.need_kvm()
    local code, out = run("timeout 600 lua5.4 examples/memory_layout.lua " .. KERNEL .. " --timeout 500")
    assert.equal(0, code, out)
    assert.matches("slot 0: 0x000000000-0x005ffffff (96 MiB)", out, 1, true)
    assert.matches("slot 1: 0x008000000-0x00dffffff (96 MiB)", out, 1, true)
    assert.matches("BIOS-e820: [mem 0x0000000008000000-0x000000000dffffff] usable", out, 1, true)
    assert.matches("e820: the kernel's map matches the layout; command line read through the zero page " ..
      "at 0x90000: yes", out, 1, true)
    assert.matches("\nok\n$", out)
  end)

  it("trace_io.lua: live tables on stderr, the final one on stdout", function()
    support.need_kvm()
    local code, out = run("timeout 300 lua5.4 examples/trace_io.lua " .. KERNEL .. " --seconds 20 --every 8")
    assert.equal(0, code, out)
    -- the live reports at 8 and 16 s, and the final one
    assert.equal(3, lines_matching(out, "^trace_io: %d+ s, %d+ port accesses on %d+ ports"), out)
    assert.matches("port +accesses +claimed by +what", out)
    assert.matches("\n  0x03f8 +%d+  serial +COM1 data\n", out)
    assert.matches("\n  0x03fd +%d+  serial +COM1 LSR\n", out)
  end)
end)
