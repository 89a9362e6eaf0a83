/*
** socket.c - kvm.socket: the few TCP calls the GDB stub (kvm.gdb) needs,
** so that it needs no socket library: listen on an address, accept, connect,
** and send and receive with timeouts (poll), never blocking for longer than
** asked and never raising SIGPIPE. Every call returns fail, message, errno
** when the system says no.
*/

/***
A TCP socket: `kvm.tcp_listen(host, port)`, `kvm.tcp_connect(host, port)`,
then `s:accept`, `s:recv`, `s:send`, `s:close`.
@classmod kvm.socket
*/
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "luakvm.h"

#define SOCKET_MT "kvm.socket"
#define RECV_MAX (1 << 20)

typedef struct Sock {
  int fd;                 /* -1 when closed */
  int listening;
  struct sockaddr_in addr;   /* bound (listening) or peer (connected) */
} Sock;

static Sock *tosock(lua_State *L, int arg) {
  return (Sock *)luaL_checkudata(L, arg, SOCKET_MT);
}

static Sock *checksock(lua_State *L, int arg) {
  Sock *s = tosock(L, arg);
  if (s->fd < 0) luaL_error(L, "attempt to use a closed kvm.socket");
  return s;
}

static Sock *new_sock(lua_State *L) {
  Sock *s = lua_newuserdatauv(L, sizeof(Sock), 0);
  memset(s, 0, sizeof *s);
  s->fd = -1;
  luaL_setmetatable(L, SOCKET_MT);
  return s;
}

/* an IPv4 address and port from the arguments at arg, arg + 1 */
static void check_addr(lua_State *L, int arg, struct sockaddr_in *sa) {
  const char *host = luaL_checkstring(L, arg);
  lua_Integer port = luaL_checkinteger(L, arg + 1);
  luaL_argcheck(L, port >= 0 && port <= 65535, arg + 1, "port out of range");
  memset(sa, 0, sizeof *sa);
  sa->sin_family = AF_INET;
  sa->sin_port = htons((uint16_t)port);
  if (strcmp(host, "localhost") == 0) host = "127.0.0.1";
  if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
    luaL_argerror(L, arg, "an IPv4 address expected (like \"127.0.0.1\")");
}

/* timeout in ms from seconds at arg: -1 (none) for nil */
static int check_timeout(lua_State *L, int arg) {
  if (lua_isnoneornil(L, arg)) return -1;
  lua_Number t = luaL_checknumber(L, arg);
  luaL_argcheck(L, t >= 0 && t <= 1e6 && !isnan(t), arg, "timeout: seconds from 0 to 1e6 expected");
  return (int)(t * 1000.0 + 0.5);
}

/* wait for events on fd: 1 ready, 0 timeout, -1 error (errno) */
static int wait_fd(int fd, short events, int ms) {
  struct pollfd p = {fd, events, 0};
  for (;;) {
    int r = poll(&p, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    return r < 0 ? -1 : r;
  }
}

static int push_timeout(lua_State *L) {
  luaL_pushfail(L);
  lua_pushliteral(L, "timeout");
  return 2;
}

/*** Listen on a TCP address (SO_REUSEADDR, backlog 1).
@function tcp_listen
@static
@tparam string host an IPv4 address: "127.0.0.1" (or "localhost"), "0.0.0.0"
@tparam integer port 0 for any free one (see socket:port)
@treturn kvm.socket
@return[2] fail, "bind: Address already in use", errno
*/
static int l_tcp_listen(lua_State *L) {
  struct sockaddr_in sa;
  check_addr(L, 1, &sa);
  Sock *s = new_sock(L);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return kvm_fail(L, "socket");
  int one = 1;
  (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  const char *what = NULL;
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) what = "bind";
  else if (listen(fd, 1) < 0) what = "listen";
  if (what) {
    int en = errno;
    close(fd);
    errno = en;
    return kvm_fail(L, what);
  }
  socklen_t len = sizeof sa;
  if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
    int en = errno;
    close(fd);
    errno = en;
    return kvm_fail(L, "getsockname");
  }
  s->fd = fd;
  s->listening = 1;
  s->addr = sa;
  return 1;
}

/*** Connect to a TCP address.
@function tcp_connect
@static
@tparam string host an IPv4 address
@tparam integer port
@tparam[opt] number timeout seconds (default: the system's)
@treturn kvm.socket
@return[2] fail, "connect: Connection refused", errno (or fail, "timeout")
*/
static int l_tcp_connect(lua_State *L) {
  struct sockaddr_in sa;
  check_addr(L, 1, &sa);
  int ms = check_timeout(L, 3);
  Sock *s = new_sock(L);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return kvm_fail(L, "socket");
  s->fd = fd;               /* closed by the GC or close() from here on */
  if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
    if (errno != EINPROGRESS) { int en = errno; close(fd); s->fd = -1; errno = en; return kvm_fail(L, "connect"); }
    int r = wait_fd(fd, POLLOUT, ms);
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (r == 0) { close(fd); s->fd = -1; return push_timeout(L); }
    if (r < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len) < 0 || soerr) {
      int en = r < 0 ? errno : soerr ? soerr : errno;
      close(fd);
      s->fd = -1;
      errno = en;
      return kvm_fail(L, "connect");
    }
  }
  int one = 1;
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  s->addr = sa;
  return 1;
}

/*** Accept a connection (TCP_NODELAY set on it).
@function socket:accept
@tparam[opt] number timeout seconds (nil: wait for one; 0: only one already there)
@treturn kvm.socket the connection
@return[2] fail, "timeout"
@return[3] fail, "accept: ...", errno
*/
static int l_sock_accept(lua_State *L) {
  Sock *s = checksock(L, 1);
  if (!s->listening) return luaL_error(L, "accept() on a socket that does not listen");
  int ms = check_timeout(L, 2);
  int r = wait_fd(s->fd, POLLIN, ms);
  if (r < 0) return kvm_fail(L, "poll");
  if (r == 0) return push_timeout(L);
  Sock *c = new_sock(L);
  socklen_t len = sizeof c->addr;
  int fd = accept4(s->fd, (struct sockaddr *)&c->addr, &len, SOCK_CLOEXEC | SOCK_NONBLOCK);
  if (fd < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return push_timeout(L);
    return kvm_fail(L, "accept");
  }
  int one = 1;
  (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  c->fd = fd;
  return 1;
}

/*** Receive what has arrived, up to max bytes.
@function socket:recv
@tparam[opt=65536] integer max 1 to 1 MiB
@tparam[opt] number timeout seconds (nil: wait; 0: only what is there)
@treturn string at least one byte
@return[2] fail, "timeout" (nothing arrived in time) or fail, "closed" (the peer closed it)
@return[3] fail, "recv: ...", errno
*/
static int l_sock_recv(lua_State *L) {
  Sock *s = checksock(L, 1);
  if (s->listening) return luaL_error(L, "recv() on a listening socket");
  lua_Integer max = luaL_optinteger(L, 2, 65536);
  luaL_argcheck(L, max >= 1 && max <= RECV_MAX, 2, "1 to 1048576 bytes expected");
  int ms = check_timeout(L, 3);
  int r = wait_fd(s->fd, POLLIN, ms);
  if (r < 0) return kvm_fail(L, "poll");
  if (r == 0) return push_timeout(L);
  luaL_Buffer b;
  char *p = luaL_buffinitsize(L, &b, (size_t)max);
  ssize_t n;
  do n = recv(s->fd, p, (size_t)max, MSG_DONTWAIT); while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return push_timeout(L);
  if (n < 0) return kvm_fail(L, "recv");
  if (n == 0) {
    luaL_pushfail(L);
    lua_pushliteral(L, "closed");
    return 2;
  }
  luaL_pushresultsize(&b, (size_t)n);
  return 1;
}

/*** Send all of a string.
@function socket:send
@tparam string data
@tparam[opt=10] number timeout seconds the peer may take to make room
@treturn true
@return[2] fail, "timeout", or fail, "send: Broken pipe", errno (the peer is gone)
*/
static int l_sock_send(lua_State *L) {
  Sock *s = checksock(L, 1);
  if (s->listening) return luaL_error(L, "send() on a listening socket");
  size_t len;
  const char *data = luaL_checklstring(L, 2, &len);
  int ms = lua_isnoneornil(L, 3) ? 10000 : check_timeout(L, 3);
  size_t done = 0;
  while (done < len) {
    ssize_t n = send(s->fd, data + done, len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n >= 0) { done += (size_t)n; continue; }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return kvm_fail(L, "send");
    int r = wait_fd(s->fd, POLLOUT, ms);
    if (r < 0) return kvm_fail(L, "poll");
    if (r == 0) return push_timeout(L);
  }
  lua_pushboolean(L, 1);
  return 1;
}

/*** The local port (a listening socket's: the one chosen for port 0).
@function socket:port
@treturn integer
*/
static int l_sock_port(lua_State *L) {
  Sock *s = checksock(L, 1);
  struct sockaddr_in sa;
  memset(&sa, 0, sizeof sa);
  socklen_t len = sizeof sa;
  if (getsockname(s->fd, (struct sockaddr *)&sa, &len) < 0) return kvm_fail(L, "getsockname");
  lua_pushinteger(L, ntohs(sa.sin_port));
  return 1;
}

/*** Close it (again: nothing).
@function socket:close
*/
static int l_sock_close(lua_State *L) {
  Sock *s = tosock(L, 1);
  if (s->fd >= 0) {
    close(s->fd);
    s->fd = -1;
  }
  return 0;
}

static int l_sock_tostring(lua_State *L) {
  Sock *s = tosock(L, 1);
  char ip[INET_ADDRSTRLEN] = "?";
  if (s->fd < 0) { lua_pushliteral(L, "kvm.socket (closed)"); return 1; }
  inet_ntop(AF_INET, &s->addr.sin_addr, ip, sizeof ip);
  lua_pushfstring(L, "kvm.socket %s %s:%d", s->listening ? "listening on" : "connected to", ip,
                  (int)ntohs(s->addr.sin_port));
  return 1;
}

static const luaL_Reg sock_methods[] = {
  {"accept", l_sock_accept},
  {"recv", l_sock_recv},
  {"send", l_sock_send},
  {"port", l_sock_port},
  {"close", l_sock_close},
  {NULL, NULL}
};

/* the class, and kvm.tcp_listen and kvm.tcp_connect into the module table on the top */
void kvm_open_socket(lua_State *L) {
  static const luaL_Reg meta[] = {
    {"__gc", l_sock_close},
    {"__close", l_sock_close},
    {"__tostring", l_sock_tostring},
    {NULL, NULL}
  };
  kvm_new_class(L, SOCKET_MT, sock_methods, meta);
  lua_pushcfunction(L, l_tcp_listen);
  lua_setfield(L, -2, "tcp_listen");
  lua_pushcfunction(L, l_tcp_connect);
  lua_setfield(L, -2, "tcp_connect");
}
