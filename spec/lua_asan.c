/*
** lua_asan.c - a minimal stand-in for the lua5.4 command, linked with
** AddressSanitizer and UndefinedBehaviorSanitizer, for `make check-memory`.
** The Makefile puts it first in PATH as "lua5.4", so specs and the child
** processes they start (examples, `lua5.4 -e ...`) load the sanitized
** kvm/core.so, while other programs (as, ld, mktemp, gcc) run unpreloaded.
** Supports what the project uses: `lua5.4 [-e chunk]... [script [args]]`.
*/
#include <stdio.h>
#include <string.h>
#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  luaL_traceback(L, L, msg, 1);
  return 1;
}

static int report(lua_State *L, int status) {
  if (status != LUA_OK) {
    fprintf(stderr, "lua5.4: %s\n", lua_tostring(L, -1));
    lua_pop(L, 1);
  }
  return status;
}

static int docall(lua_State *L, int narg) {
  int base = lua_gettop(L) - narg;
  lua_pushcfunction(L, msghandler);
  lua_insert(L, base);
  int status = lua_pcall(L, narg, 0, base);
  lua_remove(L, base);
  return status;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  if (L == NULL) return 1;
  luaL_openlibs(L);
  int script = argc, i;
  for (i = 1; i < argc; i++) {
    if (strcmp(argv[i], "-e") == 0 && i + 1 < argc) { i++; continue; }
    script = i;
    break;
  }
  /* arg table as lua.c builds it */
  int base = script < argc ? script : 0;   /* the script is arg[0] */
  lua_createtable(L, argc, 1);
  for (i = 0; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i - base);
  }
  lua_setglobal(L, "arg");
  int status = LUA_OK;
  for (i = 1; i < script && status == LUA_OK; i++) {
    if (strcmp(argv[i], "-e") == 0) {
      status = luaL_loadbuffer(L, argv[i + 1], strlen(argv[i + 1]), "=(command line)");
      if (status == LUA_OK) status = docall(L, 0);
      report(L, status);
      i++;
    }
  }
  if (status == LUA_OK && script < argc) {
    status = luaL_loadfile(L, argv[script]);
    if (status == LUA_OK) {
      int n = argc - script - 1;
      for (i = script + 1; i < argc; i++) lua_pushstring(L, argv[i]);
      status = docall(L, n);
    }
    report(L, status);
  }
  lua_close(L);
  return status == LUA_OK ? 0 : 1;
}
