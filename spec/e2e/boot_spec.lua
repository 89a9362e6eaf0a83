-- End-to-end: boot Debian's cloud kernel (fetched by `make kernel` into
-- guest-kernel/) as an ELF vmlinux and as a bzImage, and check the milestones
-- this machine can show. Slow (one to three minutes per boot here): tagged e2e.
local support = require "support"
local linux = require "kvm.linux"

local DIR = os.getenv("LUAKVM_KERNEL_DIR") or "guest-kernel"
local CONSOLE = "printk: console [ttyS0] enabled"

local exists = support.exists

-- boot until `marker` shows on the console (or the timeout); returns the
-- console text, ctx and the exit
local function boot_until(opts, marker, timeout)
  local out = {}
  local seen = ""
  local ctx
  opts.output = function(bytes)
    out[#out + 1] = bytes
    seen = (seen .. bytes):sub(-4096)
    if seen:find(marker, 1, true) then ctx.cpu:stop() end
  end
  local err
  ctx, err = linux.setup(opts)
  assert(ctx, err)
  local e = linux.run(ctx, { timeout = timeout })
  local text = table.concat(out)
  ctx.vm:close()
  return text, ctx, e
end

local function e820_lines(map)
  local names = { [1] = "usable", [2] = "reserved" }
  local lines = {}
  for _, ent in ipairs(map:entries()) do
    lines[#lines + 1] = string.format("BIOS-e820: [mem 0x%016x-0x%016x] %s",
      ent.addr, ent.addr + ent.size - 1, names[ent.type])
  end
  return lines
end

local function check_milestones(text, ctx)
  assert.truthy(text:find("Linux version 6.", 1, true), "banner")
  assert.truthy(text:find("Command line: " .. ctx.cmdline, 1, true), "command line echoed")
  for _, line in ipairs(e820_lines(ctx.e820)) do
    assert.truthy(text:find(line, 1, true), "e820 line: " .. line)
  end
  assert.truthy(text:find("Hypervisor detected: KVM", 1, true), "hypervisor")
end

describe("#e2e Linux boot", function()
  it("boots the ELF vmlinux to the serial console", function()
    support.need_kvm()
    if not exists(DIR .. "/vmlinux") then return pending("no " .. DIR .. "/vmlinux: run make kernel") end
    local text, ctx, e = boot_until({ kernel = DIR .. "/vmlinux", memory = 128 << 20 }, CONSOLE, 400)
    check_milestones(text, ctx)
    assert.truthy(text:find(CONSOLE, 1, true), "console enabled; run ended with " .. tostring(e))
    assert.equal("stopped", e.reason)
  end)

  it("boots the bzImage: decompresses itself and prints the banner", function()
    support.need_kvm()
    if not exists(DIR .. "/bzImage") then return pending("no " .. DIR .. "/bzImage: run make kernel") end
    local text, ctx, e = boot_until({ kernel = DIR .. "/bzImage", memory = 128 << 20 },
      "Hypervisor detected: KVM", 600)
    check_milestones(text, ctx)
    assert.equal("bzimage", ctx.kind)
    assert.equal("stopped", e.reason)
  end)
end)
