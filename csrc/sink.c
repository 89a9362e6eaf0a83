/*
** sink.c - a device's output to a Lua FILE or function (sink.h).
*/
#include <string.h>

#include "sink.h"

luaL_Stream *sink_checkfile(lua_State *L, int idx, const char *who, const char *field) {
  luaL_Stream *p = (luaL_Stream *)luaL_testudata(L, idx, LUA_FILEHANDLE);
  if (p == NULL) return NULL;
  if (p->closef == NULL || p->f == NULL) luaL_error(L, "%s: '%s' is a closed file", who, field);
  return p;
}

/* the value of the option, on the stack top: its kind */
static int sink_kind(lua_State *L, const char *field, const char *who) {
  switch (lua_type(L, -1)) {
  case LUA_TNIL:
    lua_pop(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);
    lua_getfield(L, -1, "io");
    if (!lua_istable(L, -1))
      luaL_error(L, "%s: no '%s' given and the io library is not loaded", who, field);
    lua_getfield(L, -1, "stdout");
    lua_replace(L, -3);
    lua_pop(L, 1);
    if (sink_checkfile(L, -1, who, "io.stdout") == NULL) luaL_error(L, "%s: io.stdout is not a file", who);
    return SINK_FILE;
  case LUA_TBOOLEAN:
    if (lua_toboolean(L, -1)) break;
    return SINK_NONE;
  case LUA_TFUNCTION:
    return SINK_FUNC;
  default:
    if (sink_checkfile(L, -1, who, field)) return SINK_FILE;
  }
  return luaL_error(L, "%s: '%s' must be a file, a function or false, got %s", who, field,
                    luaL_typename(L, -1));
}

void sink_open(lua_State *L, Sink *k, int opts, const char *field, const char *who) {
  lua_getfield(L, opts, field);
  k->kind = sink_kind(L, field, who);
  k->ref = k->kind == SINK_NONE ? 0 : kvm_vm_ref(L, 1, -1);
  lua_pop(L, 1);
  k->len = 0;
  k->want = 0;
}

static int flush_work(BusCall *bc, void *k) { return sink_flush(k, bc); }

int sink_flush(Sink *k, BusCall *bc) {
  lua_State *L = bc->L;
  if (L == NULL) {             /* a vCPU thread of vm:run: the Lua thread writes it */
    if (k->len == 0 || k->kind == SINK_NONE) { k->len = 0; k->want = 0; return BUS_OK; }
    return bus_lua(bc, flush_work, k);
  }
  size_t n = k->len;
  k->want = 0;
  k->len = 0;
  if (n == 0 || k->kind == SINK_NONE) return BUS_OK;
  lua_rawgeti(L, bc->tab, k->ref);
  if (k->kind == SINK_FILE) {
    luaL_Stream *p = (luaL_Stream *)luaL_testudata(L, -1, LUA_FILEHANDLE);
    lua_pop(L, 1);
    if (p == NULL || p->closef == NULL) {
      lua_pushliteral(L, "output: attempt to use a closed file");
      return BUS_ERROR;
    }
    if (fwrite(k->buf, 1, n, p->f) < n) k->dropped += n;   /* e.g. EPIPE: lost */
    fflush(p->f);
    return BUS_OK;
  }
  lua_pushlstring(L, k->buf, n);
  /* a handler as far as run() is concerned: it may not run a vCPU */
  Vm *vm = bc->c ? bc->c->vm : NULL;
  if (vm) vm->in_handler++;
  int st = lua_pcall(L, 1, 0, bc->msgh);
  if (vm) vm->in_handler--;
  return st == LUA_OK ? BUS_OK : BUS_ERROR;
}
