--- boot.lua: rows 5 and 6 of `make bench`, a Linux boot by luakvm beside the
-- same boot by QEMU (`-M microvm -accel kvm`): the same ELF vmlinux, command
-- line and 128 MiB, each spawned as a child whose console is read through a
-- pipe, timestamps taken by this reader as each line arrives.
--
--   5. memory: at "printk: console [ttyS0] enabled", the child's VmRSS less
--      the Rss of its 128 MiB guest RAM mapping (found in /proc/PID/smaps by
--      its size): what the VMM itself keeps resident. Goal <= 5 MiB.
--   6. boot: spawn to "console [ttyS0] enabled" (goal: ratio <= 1.0x),
--      spawn to the first kernel message (the VMM's own set-up cost; QEMU's
--      includes its firmware), and spawn to "Run /init as init process" with
--      the same initramfs (`make kernel`'s busybox one), and spawn to the
--      shell's prompt ("/ # ", busybox init's shell on the console).
--
-- Used by bench/bench.lua (`local boot = dofile "bench/boot.lua"`); runs from
-- the top of the tree.
local kvm = require "kvm"
local linux = require "kvm.linux"
local hostprofile = require "kvm.hostprofile"

local boot = {}

boot.MILESTONE = "printk: console [ttyS0] enabled"
boot.MEMORY_MIB = 128
boot.VMLINUX = os.getenv("VMLINUX") or "guest-kernel/vmlinux"
boot.INITRD = os.getenv("INITRD") or "guest-kernel/initramfs.cpio.gz"
boot.INIT = "Run /init as init process"
boot.PROMPT = "/ # "
boot.TIMEOUT = tonumber(os.getenv("BOOT_TIMEOUT") or "300")
boot.OUT = "bench/out"

--- The command line our boot uses on this host: linux.DEFAULT_CMDLINE plus
-- the detected host profile's parameters (what linux.plan builds).
function boot.cmdline()
  return linux.cmdline({}, hostprofile.detect())
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

--- The two commands, as shell words.
function boot.commands()
  return {
    ours = ("lua5.4 examples/boot_linux.lua %s --initrd %s --timeout %d")
      :format(q(boot.VMLINUX), q(boot.INITRD), boot.TIMEOUT),
    qemu = ("qemu-system-x86_64 -M microvm -accel kvm -cpu host,-arch-capabilities,-cx16 -m %dM "
      .. "-nodefaults -no-user-config -nographic -serial stdio -kernel %s -initrd %s -append %s")
      :format(boot.MEMORY_MIB, q(boot.VMLINUX), q(boot.INITRD), q(boot.cmdline())),
  }
end

local function slurp(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

--- Resident memory of process `pid` (KiB): VmRSS, RssAnon, RssFile from
-- /proc/PID/status, and `guest`, the Rss of the anonymous mapping whose size
-- is the guest's RAM (nil if there is none).
function boot.memory(pid)
  local status, smaps = slurp("/proc/" .. pid .. "/status"), slurp("/proc/" .. pid .. "/smaps")
  if not status or not smaps then return nil end
  local m = {
    rss = tonumber(status:match("VmRSS:%s*(%d+)")),
    anon = tonumber(status:match("RssAnon:%s*(%d+)")),
    file = tonumber(status:match("RssFile:%s*(%d+)")),
  }
  local want = boot.MEMORY_MIB * 1024
  local anon, size
  for line in smaps:gmatch("[^\n]+") do
    local path = line:match("^%x+%-%x+ %S+ %x+ %S+ %d+%s*(.*)$")
    if path then
      anon, size = (path == ""), nil
    elseif anon then
      local k, v = line:match("^(%a+):%s*(%d+) kB")
      if k == "Size" then size = tonumber(v)
      elseif k == "Rss" and size == want then
        m.guest = math.max(m.guest or 0, tonumber(v))
      end
    end
  end
  return m
end

-- the VMM: timeout(1)'s child
local function child(tpid)
  local c = slurp(("/proc/%s/task/%s/children"):format(tpid, tpid))
  return c and c:match("%d+")
end

local function kill(pid)
  os.execute(("kill -KILL %s 2>/dev/null"):format(pid))
end

--- One boot: spawn `cmd`, read its console to the shell's prompt, take the
-- memory at the console milestone, kill it. The console goes to bench/out/boot-NAME.log, stderr to .err.
-- @treturn table {first = s, console = s, init = s ("Run /init"), shell = s
--   (the prompt), mem =
--   boot.memory() at the console milestone, last = line, cmdline = the
--   command line the kernel printed}
--   (`console` nil and `stopped` = "exit 3 after 95 s" if the child stopped or
--   timed out before the milestone; timeout(1) exits 137 then)
function boot.once(name, cmd)
  os.execute("mkdir -p " .. boot.OUT)
  local log = assert(io.open(("%s/boot-%s.log"):format(boot.OUT, name), "w"))
  -- the shell prints its pid, which exec makes timeout(1)'s; timeout kills
  -- the VMM (its only child) if the milestone has not come after BOOT_TIMEOUT s
  local sh = ("exec 2>%s/boot-%s.err </dev/null; echo $$; exec timeout -s KILL %d %s")
    :format(boot.OUT, name, boot.TIMEOUT + 30, cmd)
  local t0 = kvm.now()
  local p = assert(io.popen(sh, "r"))
  local tpid = p:read("l")
  local pid
  local r = { last = "" }
  -- read bytes, not lines: the prompt has no newline after it
  local partial = ""
  local function line_done(line, t)
    line = line:gsub("\r", "")
    log:write(("%9.3f %s\n"):format(t, line))
    if line ~= "" then r.last = line end
    if not r.first and line:match("^%[%s*%d+%.%d+%]") then r.first = t end
    r.cmdline = r.cmdline or line:match("^%[%s*%d+%.%d+%] Command line: (.-)%s*$")
    if not r.console and line:find(boot.MILESTONE, 1, true) then
      r.console = t
      pid = child(tpid)
      r.mem = pid and boot.memory(pid)
    end
    if not r.init and line:find(boot.INIT, 1, true) then r.init = t end
  end
  while true do
    local c = p:read(1)
    if not c then break end
    local t = kvm.now() - t0
    if c == "\n" then
      line_done(partial, t)
      partial = ""
    else
      partial = partial .. c
      if r.init and partial:sub(-#boot.PROMPT) == boot.PROMPT then
        r.shell = t
        line_done(partial, t)
        break
      end
    end
  end
  pid = pid or child(tpid)
  if pid and r.console then kill(pid) end
  local _, how, code = p:close()
  if not r.console then r.stopped = ("%s %s after %.0f s"):format(how, code, kvm.now() - t0) end
  log:close()
  return r
end

--- Rows 5 and 6: `rounds` boots each, interleaved ours/QEMU.
-- @tparam integer rounds
-- @tparam function progress(msg)
-- @treturn table {ours = {r1, r2, ...}, qemu = {...}} of boot.once results,
--   and `cmdline`, the command line both were given
function boot.measure(rounds, progress)
  local cmds = boot.commands()
  local res = { ours = {}, qemu = {}, cmdline = boot.cmdline() }
  for r = 1, rounds do
    for _, who in ipairs{ "ours", "qemu" } do
      progress(("boot %d/%d: %s"):format(r, rounds, who))
      res[who][r] = boot.once(("%s-%d"):format(who, r), cmds[who])
    end
  end
  return res
end

return boot
