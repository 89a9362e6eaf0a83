rockspec_format = "3.0"
package = "luakvm"
version = "scm-1"
source = {
  url = "git+file:///work/main",
}
description = {
  summary = "Build and run KVM virtual machines from Lua 5.4",
  detailed = [[
A C core (kvm.core) wraps the Linux KVM API: VMs, guest memory, vCPUs, exits,
a run loop with port/MMIO dispatch to C devices and Lua handlers. Lua modules
build page tables, GDTs, boot_params and e820 maps, and boot Linux kernels.]],
  license = "MIT",
  homepage = "https://example.invalid/luakvm",
}
supported_platforms = { "linux" }
dependencies = {
  "lua >= 5.4, < 5.5",
}
external_dependencies = {
  LIBELF = { header = "libelf.h", library = "elf" },
}
build = {
  type = "builtin",
  modules = {
    ["kvm.core"] = {
      -- the helpers, the module, the VM, then memory, vCPU, run loop and bus, then the devices
      sources = { "csrc/util.c", "csrc/core.c", "csrc/vm.c", "csrc/mem.c", "csrc/vcpu.c", "csrc/run.c",
                  "csrc/exit.c", "csrc/bus.c", "csrc/sink.c", "csrc/uart.c", "csrc/legacy.c",
                  "csrc/power.c", "csrc/debugexit.c", "csrc/debugcon.c", "csrc/luadev.c",
                  "csrc/elf.c", "csrc/sandbox.c" },
      libraries = { "elf" },
      incdirs = { "csrc", "$(LIBELF_INCDIR)" },
      libdirs = { "$(LIBELF_LIBDIR)" },
      defines = {},
    },
    ["kvm"] = "lua/kvm/init.lua",
    ["kvm.x86"] = "lua/kvm/x86.lua",
    ["kvm.bootparams"] = "lua/kvm/bootparams.lua",
    ["kvm.e820"] = "lua/kvm/e820.lua",
    ["kvm.linux"] = "lua/kvm/linux.lua",
    ["kvm.hostprofile"] = "lua/kvm/hostprofile.lua",
    ["kvm.emulate"] = "lua/kvm/emulate.lua",
    ["kvm.acpi"] = "lua/kvm/acpi.lua",
    ["kvm.cpuid"] = "lua/kvm/cpuid.lua",
    ["kvm.cli"] = "lua/kvm/cli.lua",
  },
  install = {
    bin = { ["kvm-boot"] = "examples/boot_linux.lua" },
  },
}
test = {
  type = "command",
  command = "lua5.4 spec/run.lua --exclude-tags=e2e",
}
