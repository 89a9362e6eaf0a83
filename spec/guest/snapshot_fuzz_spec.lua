--- examples/snapshot_fuzz.lua: the fuzzing loop on vm:snapshot()/vm:restore()
-- finds both bugs planted in its guest (examples/guests/fuzz_target.S) with a
-- fixed seed, every exec starts from the snapshot's state, and each crash
-- input it prints crashes again on its own. The guest is deterministic (no
-- timer, no interrupt), so a seed gives the same run on any KVM: the exec
-- numbers and inputs below are exact.
local support = require "support"

-- exit status and output (stderr too) of a command: support.sh's, swapped
local function run(cmd)
  local out, code = support.sh(cmd)
  return code, out
end

local FUZZ = "timeout 300 lua5.4 examples/snapshot_fuzz.lua "
local CANARY_INPUT = "4b560102030208fe026162"      -- "KV" 1, 2 records: set [8] = 0xfe; ...
local TRIPLE_INPUT = "4b560102f90268790402006163"  -- "KV" 1, 2 records: (skipped); div by 0

describe("examples/snapshot_fuzz.lua #guest", function()
  it("--seed 1 finds both planted bugs within 1500 execs, each exec from the same state", function()
    support.need_kvm()
    local code, out = run(FUZZ .. "--seed 1 --execs 1500")
    assert.equal(0, code, out)
    assert.matches("^snapshot: at rip=0x101b %(the guest's write to port 0x500%): kvm%.snapshot %(1 vCPUs, "
      .. "1 memory regions, 1 MiB%)\n", out)
    assert.matches("\nfuzzing: seed 1, 1500 execs, from one input: 4b5601020102686902026162\n", out, 1, true)
    assert.matches("\ncrash at exec 418: canary overwritten (port 0x502): " .. CANARY_INPUT .. "\n", out, 1, true)
    assert.matches("\ncrash at exec 1133: triple fault (shutdown): " .. TRIPLE_INPUT .. "\n", out, 1, true)
    assert.matches("\n1500 execs in [%d.]+ s: %d+ execs/s %(restore %d+%%, run %d+%%%); "
      .. "pages copied per restore: median 3\n", out)
    assert.matches("\noutcomes: accepted 138, rejected 1360, crash 2, hang 0, other 0; corpus 29 inputs, 29 paths\n",
      out, 1, true)
    -- what each exec found at its start: the guest's counter (0 in the
    -- snapshot, so 1) and the sum over its work area (the canary alone)
    assert.matches("\nevery exec started from the same state: counter 1, work area sum 0x0000c0de\n", out, 1, true)
  end)

  it("another seed is another run", function()
    support.need_kvm()
    local code, out = run(FUZZ .. "--seed 2 --execs 300")
    assert.equal(0, code, out)
    assert.matches("\nfuzzing: seed 2, 300 execs", out, 1, true)
    assert.not_matches("outcomes: accepted 138,", out, 1, true)
    assert.matches("\nevery exec started from the same state: counter 1, work area sum 0x0000c0de\n", out, 1, true)
  end)

  it("--input replays one input from the snapshot: each crash found, and a valid input", function()
    support.need_kvm()
    for _, c in ipairs{
      { CANARY_INPUT, "crash: canary overwritten (port 0x502)" },
      { TRIPLE_INPUT, "crash: triple fault (shutdown)" },
      { "4b5601020102686902026162", "accepted: the guest wrote 0 to port 0x501" },   -- the seed input
      { "4b56010100", "rejected: the guest wrote 1 to port 0x501" },                 -- a truncated record
      { "", "rejected: the guest wrote 1 to port 0x501" },                           -- empty
    } do
      local code, out = run(FUZZ .. "--input '" .. c[1] .. "'")
      assert.equal(0, code, out)
      assert.equal("input " .. c[1] .. ": " .. c[2] .. "\n", out:match("[^\n]*\n$"), out)
    end
  end)

  it("bad usage exits 2 with the usage text", function()
    for _, args in ipairs{ "--execs", "--execs 0", "--execs x", "--seed 1.5", "--input 4b5", "--input zz",
                           "--timeout -1", "--frobnicate" } do
      local code, out = run("lua5.4 examples/snapshot_fuzz.lua " .. args)
      assert.equal(2, code, args .. ": " .. out)
      assert.matches("^snapshot_fuzz: bad argument '%-%-%a+'\nusage: lua5%.4 examples/snapshot_fuzz%.lua", out)
    end
    local code, out = run("lua5.4 examples/snapshot_fuzz.lua --help")
    assert.equal(0, code, out)
    assert.matches("^usage: ", out)
  end)

  -- the check the example makes at each exec can fail: without vm:restore the
  -- guest's counter and its work area carry over from one exec to the next
  it("the guest's start state changes when an exec does not start from the snapshot", function()
    support.need_kvm()
    local vm, cpu = support.guest(support.slurp("examples/guests/fuzz_target.bin"), { mode = "protected" })
    vm:debug_exit(0x500)
    vm:debug_exit(0x501)
    vm:debug_exit(0x502)
    assert.equal(0x500, cpu:run{ timeout = 5 }.port)
    local snap = assert(vm:snapshot())
    local function exec(input, restore)
      if restore then assert(vm:restore(snap)) end
      vm:write(0x5000, string.pack("<s2", input))
      local e = cpu:run{ timeout = 5 }
      return e, vm:u32(0x3000), vm:u32(0x3004)
    end
    -- set [0] = 0x11: the work area changes
    local e, runs, sum = exec("KV\1\1\3\2\0\x11", true)
    assert.equal(0x501, e.port)
    assert.same({ 1, 0xc0de }, { runs, sum })
    -- the guest halted after its DONE write; point it back at the parse by hand
    cpu:set_regs{ rip = 0x101b }
    e, runs, sum = exec("KV\1\0", false)
    assert.equal(0x501, e.port)
    assert.same({ 2, 0xc0de + 0x11 }, { runs, sum })
    -- and a restore puts both back
    e, runs, sum = exec("KV\1\0", true)
    assert.equal(0x501, e.port)
    assert.same({ 1, 0xc0de }, { runs, sum })
    cpu:close()
    vm:close()
  end)
end)
