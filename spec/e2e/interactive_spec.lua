-- End-to-end: the README's run command (`make run`) on a terminal a person
-- types at. tmux plays the person: the spec starts `make run` in a detached
-- tmux session, waits for the guest's shell, types a command and `poweroff`,
-- and checks the answer, that make run returned 0 (poweroff) and that the
-- terminal's settings are what they were before (boot_linux puts it in raw
-- mode while the guest runs). Tagged userspace: on kvm_pvm make test runs it
-- nested, where make run then finds kvm_amd and boots directly.
local support = require "support"

local sh = support.sh

local exists = support.exists

describe("#e2e #userspace make run", function()
  it("boots to a shell a person types at; poweroff returns to the host prompt with the terminal restored",
    function()
      support.need_kvm()
      assert.equal(0, select(2, sh("command -v tmux")), "tmux is not installed: make deps")
      if not exists("guest-kernel/vmlinux") or not exists("guest-kernel/initramfs.cpio.gz") then
        return pending("no kernel in guest-kernel: run make kernel")
      end
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir " .. dir))
      local sock = dir .. "/tmux"
      -- every tmux call bounded: a stuck tmux fails the spec instead of hanging it
      local tmux = ("timeout -k 5 30 tmux -S %s "):format(sock)
      -- what the pane runs: the terminal's settings before and after, make's status
      local script = dir .. "/pane.sh"
      local f = assert(io.open(script, "w"))
      f:write(("stty -g >%s/before\nmake -s run\nst=$?\nstty -g >%s/after\necho MAKE-RUN-EXIT=$st\nexec sleep 600\n")
        :format(dir, dir))
      f:close()
      local _, rc = sh(tmux .. "new-session -d -x 160 -y 50 'sh " .. script .. "'")
      assert.equal(0, rc, "tmux new-session failed")
      local function screen()
        return (sh(tmux .. "capture-pane -p -S -2000"))
      end
      local function wait_for(text, seconds)
        local t0 = os.time()
        while os.time() - t0 < seconds do
          local s = screen()
          if s:find(text, 1, true) then return s end
          os.execute("sleep 0.5")
        end
        error(("%q did not appear within %d s; the screen:\n%s"):format(text, seconds, screen()))
      end
      local ok, err = pcall(function()
        wait_for("LUAKVM-INIT-OK", 150)
        wait_for("/ #", 60)
        sh(tmux .. "send-keys -t 0 'echo typed-$((6*7))' Enter")
        wait_for("typed-42", 60)
        sh(tmux .. "send-keys -t 0 poweroff Enter")
        local s = wait_for("MAKE-RUN-EXIT=", 60)
        assert.is_truthy(s:find("MAKE-RUN-EXIT=0", 1, true), "make run did not exit 0:\n" .. s)
        assert.is_truthy(s:find("the guest powered off", 1, true), s)
        assert.equal(support.slurp(dir .. "/before"), support.slurp(dir .. "/after"))
      end)
      sh(tmux .. "kill-server")
      os.execute("rm -rf " .. dir)
      assert(ok, err)
    end)
end)
