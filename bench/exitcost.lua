--- exitcost.lua: machine instructions per port-I/O exit, counted by
-- callgrind in bench/exitcost (the run loop's real dispatch path, KVM_RUN
-- faked: no KVM needed). Rows 1c-1e of `make bench` (bench/bench.lua); alone,
-- `make -C bench count`, or from the repository root after
-- `make -C bench exitcost`:
--
--     lua5.4 bench/exitcost.lua [TOP]     the rows, twice, and each scenario's
--                                         TOP (default 8) functions per exit
--
-- Counted: from KVM_RUN's return to the next KVM_RUN (collection toggled on
-- inside l_vcpu_run, off inside the faked KVM_RUN); run once with N1 and once
-- with N2 exits, the difference divided by N2 - N1, so that run()'s set-up and
-- the Exit it returns cancel. Environment: EXITCOST_N1, EXITCOST_N2 (20000,
-- 120000).
local M = {}

M.HARNESS = "bench/exitcost"
M.N1 = tonumber(os.getenv("EXITCOST_N1") or "20000")
M.N2 = tonumber(os.getenv("EXITCOST_N2") or "120000")

--- The scenarios of bench/exitcost.c, as rows: name, goal (instructions).
M.SCENARIOS = {
  { key = "cdev", name = "1c instructions per exit, C device", goal = 300 },
  { key = "lua", name = "1d instructions per exit, Lua handler", goal = 1500 },
  { key = "unclaimed", name = "1e instructions per exit, unclaimed", goal = nil },
}

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return ok, out
end

--- Can the rows be measured here? true, or false and why not.
function M.available()
  if not sh("command -v valgrind") then return false, "valgrind is not installed (make deps)" end
  if not sh("test -x " .. M.HARNESS) then return false, M.HARNESS .. " is not built (make -C bench exitcost)" end
  return true
end

-- one callgrind run of `scenario` with n exits: the instructions collected
-- and the profile's file (the caller removes it)
local function collect(scenario, n)
  local file = os.tmpname()
  local ok, out = sh(("valgrind --tool=callgrind --collect-atstart=no --toggle-collect=l_vcpu_run "
    .. "--toggle-collect=fake_kvm_run --callgrind-out-file=%s %s %s %d"):format(file, M.HARNESS, scenario, n))
  local f = io.open(file)
  local text = f and f:read("a") or ""
  if f then f:close() end
  local total = tonumber(text:match("\ntotals:%s*(%d+)") or text:match("\nsummary:%s*(%d+)"))
  if not ok or not total or not out:find("exits " .. n, 1, true) then
    os.remove(file)
    error(("exitcost %s %d under callgrind failed:\n%s"):format(scenario, n, out), 0)
  end
  return total, file
end

-- instructions per function in a profile: { [name] = n }
local function by_function(file)
  local _, out = sh("callgrind_annotate --auto=no --threshold=100 --inclusive=no --show-percs=no " .. file)
  local t = {}
  for count, where in out:gmatch("\n%s*([%d,]+)%s+([^\n]-)%s*%f[\n]") do
    if where ~= "PROGRAM TOTALS" then
      local file_, fn, obj = where:match("^(.-):(.-)%s*%[(.-)%]$")
      if not fn then file_, fn, obj = where:match("^(.-):(.-)%s*$"), where, "" end
      if fn then
        fn = fn:gsub("'%d+$", ""):gsub("@@.*", "")   -- recursion depth, symbol version
        -- liblua5.4 has no symbols here: its internal functions are one line
        if fn:match("^0x") then fn = "(Lua internals)" end
        -- the harness's own functions (the core's) plain, others with their library
        obj = (obj ~= "" and obj or file_ or "?"):match("[^/]*$"):gsub("%.so[.%d]*$", "")
        local name = obj == "exitcost" and fn or ("%s (%s)"):format(fn, obj)
        t[name] = (t[name] or 0) + tonumber((count:gsub(",", "")))
      end
    end
  end
  return t
end

--- Instructions per exit of a scenario, and (when top > 0) its top
-- functions per exit: array of {name, n}, largest first.
function M.per_exit(scenario, top)
  local c1, f1 = collect(scenario, M.N1)
  local c2, f2 = collect(scenario, M.N2)
  local per = math.floor((c2 - c1) / (M.N2 - M.N1) * 10 + 0.5) / 10
  local list = {}
  if top and top > 0 then
    local a, b = by_function(f1), by_function(f2)
    for name, n in pairs(b) do
      local d = (n - (a[name] or 0)) / (M.N2 - M.N1)
      if d >= 0.5 then list[#list + 1] = { name, d } end
    end
    table.sort(list, function(x, y) return x[2] > y[2] end)
    for i = #list, top + 1, -1 do list[i] = nil end
  end
  os.remove(f1)
  os.remove(f2)
  return per, list
end

--- "name 75, name 69, ..." for a top list.
function M.top_text(list)
  local parts = {}
  for i, e in ipairs(list) do parts[i] = ("%s %.0f"):format(e[1], e[2]) end
  return table.concat(parts, ", ")
end

-- as a script: the rows, twice each (callgrind counts are deterministic; a
-- difference between the two runs would say otherwise), and the top functions
if arg and arg[0] and arg[0]:match("exitcost%.lua$") then
  local top = tonumber(arg[1] or "8")
  local ok, why = M.available()
  if not ok then io.stderr:write("exitcost: ", why, "\n") os.exit(1) end
  for _, s in ipairs(M.SCENARIOS) do
    local a, list = M.per_exit(s.key, top)
    local b = M.per_exit(s.key)
    local met = s.goal and ((math.max(a, b) <= s.goal) and "yes" or "NO") or ""
    print(("%-38s %8.1f %8.1f  goal %-6s met %s"):format(s.name, a, b, s.goal and ("<=" .. s.goal) or "-", met))
    for _, e in ipairs(list) do print(("    %7.1f  %s"):format(e[2], e[1])) end
  end
end

return M
