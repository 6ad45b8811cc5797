// lockgate-detshim.c: LD_PRELOAD library that makes a Wizer pre-initialisation deterministic.
// Build: cc -O2 -shared -fPIC -o lockgate-detshim.so lockgate-detshim.c -ldl -lpthread
// Effect, on threads whose name starts with $DETSHIM_THREADS (all threads when unset/empty):
//   getrandom() and syscall(SYS_getrandom, ...) fill the buffer with a fixed byte pattern;
//   clock_gettime(CLOCK_REALTIME*) returns 1000000000 s, clock_gettime(CLOCK_MONOTONIC*,
//   CLOCK_BOOTTIME) returns 1000 s.
// These are what wasmtime-wasi's default WasiCtx hands the guest being snapshotted (secure and
// insecure random, wall and monotonic clocks). With $DETSHIM_FS_ROOT, also file times (below).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>

static int on_this_thread(void) {
    const char *p = getenv("DETSHIM_THREADS");
    if (!p || !*p) return 1;
    char name[32] = {0};
    if (pthread_getname_np(pthread_self(), name, sizeof name) != 0) return 0;
    return strncmp(name, p, strlen(p)) == 0;
}

static void fill(void *buf, size_t n) {
    unsigned char *p = buf;
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 131 + 7);
}

ssize_t getrandom(void *buf, size_t n, unsigned flags) {
    if (on_this_thread()) { fill(buf, n); return (ssize_t)n; }
    static ssize_t (*real)(void *, size_t, unsigned);
    if (!real) real = (ssize_t (*)(void *, size_t, unsigned))dlsym(RTLD_NEXT, "getrandom");
    return real(buf, n, flags);
}

long syscall(long no, ...) {
    va_list ap;
    va_start(ap, no);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (no == SYS_getrandom && on_this_thread()) { fill((void *)a[0], (size_t)a[1]); return a[1]; }
    static long (*real)(long, ...);
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(no, a[0], a[1], a[2], a[3], a[4], a[5]);
}

int clock_gettime(clockid_t c, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(c, ts);
    if (r != 0 || !on_this_thread()) return r;
    if (c == CLOCK_REALTIME || c == CLOCK_REALTIME_COARSE) { ts->tv_sec = 1000000000; ts->tv_nsec = 0; }
    else if (c == CLOCK_MONOTONIC || c == CLOCK_MONOTONIC_COARSE || c == CLOCK_MONOTONIC_RAW || c == CLOCK_BOOTTIME) { ts->tv_sec = 1000; ts->tv_nsec = 0; }
    return r;
}

// File times, for componentize-py: the interpreter it snapshots stats the standard library,
// bindings and helpers componentize-py unpacks into temporary folders, and keeps what it saw
// (directory times in importlib's caches). Under $DETSHIM_FS_ROOT (the build's TMPDIR), every
// file written and every folder made gets a fixed time, its parent folder too (the kernel sets a
// folder's time whenever an entry is added or removed), and every new folder gets a
// `__pycache__` file, so the interpreter cannot write bytecode caches there (which would change
// folder times again, from inside the guest, where this library cannot reach).
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

static const struct timespec fixed_times[2] = {{1000000000, 0}, {1000000000, 0}};

static int under_root(const char *path) {
    const char *root = getenv("DETSHIM_FS_ROOT");
    if (!root || !*root || !path) return 0;
    size_t n = strlen(root);
    return strncmp(path, root, n) == 0 && (path[n] == '/' || path[n] == 0);
}

static void absolute(const char *path, char *out) {
    if (path[0] == '/' || !getcwd(out, PATH_MAX)) {
        snprintf(out, PATH_MAX, "%s", path);
    } else {
        size_t n = strlen(out);
        snprintf(out + n, PATH_MAX - n, "/%s", path);
    }
}

static void fix_parent(const char *abs) {
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", abs);
    char *slash = strrchr(parent, '/');
    if (!slash || slash == parent) return;
    *slash = 0;
    if (under_root(parent)) utimensat(AT_FDCWD, parent, fixed_times, 0);
}

int mkdir(const char *path, mode_t mode) {
    static int (*real)(const char *, mode_t);
    if (!real) real = (int (*)(const char *, mode_t))dlsym(RTLD_NEXT, "mkdir");
    int r = real(path, mode);
    if (r != 0) return r;
    char abs[PATH_MAX];
    absolute(path, abs);
    if (!under_root(abs)) return r;
    char blocker[PATH_MAX + 16];
    int len = snprintf(blocker, sizeof blocker, "%s/__pycache__", abs);
    int fd = len > 0 && (size_t)len < sizeof blocker
        ? open(blocker, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444)
        : -1;
    if (fd >= 0) {
        futimens(fd, fixed_times);
        // The real close: this file needs no more than the times just set.
        syscall(SYS_close, fd);
    }
    utimensat(AT_FDCWD, abs, fixed_times, 0);
    fix_parent(abs);
    return r;
}

int close(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "close");
    char link[64], abs[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, abs, sizeof abs - 1);
    int fix = 0;
    if (n > 0) {
        abs[n] = 0;
        struct stat st;
        fix = under_root(abs) && fstat(fd, &st) == 0 && (S_ISREG(st.st_mode) || S_ISDIR(st.st_mode));
        if (fix) futimens(fd, fixed_times);
    }
    int r = real(fd);
    if (fix) fix_parent(abs);
    return r;
}

static void fix_path_and_parent(const char *path) {
    char abs[PATH_MAX];
    absolute(path, abs);
    if (!under_root(abs)) return;
    utimensat(AT_FDCWD, abs, fixed_times, AT_SYMLINK_NOFOLLOW);
    fix_parent(abs);
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    int r = real(from, to);
    if (r == 0) {
        char abs[PATH_MAX];
        absolute(from, abs);
        fix_parent(abs);
        fix_path_and_parent(to);
    }
    return r;
}

// A removed entry changes its folder's time, like an added one.
static int removed(int r, const char *path) {
    if (r == 0) {
        char abs[PATH_MAX];
        absolute(path, abs);
        fix_parent(abs);
    }
    return r;
}

int unlink(const char *path) {
    static int (*real)(const char *);
    if (!real) real = (int (*)(const char *))dlsym(RTLD_NEXT, "unlink");
    return removed(real(path), path);
}

int rmdir(const char *path) {
    static int (*real)(const char *);
    if (!real) real = (int (*)(const char *))dlsym(RTLD_NEXT, "rmdir");
    return removed(real(path), path);
}
