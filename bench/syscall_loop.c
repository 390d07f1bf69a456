// bench/syscall_tax's loop: N getppid() system calls by a process that is no VMM, timed with
// the thread's own CPU clock (time spent descheduled by other load does not count).
// Prints: calls, wall ns per call, CPU ns per call.
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static double ns(clockid_t c)
{
    struct timespec t;
    clock_gettime(c, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    if (n < 1) {
        fprintf(stderr, "usage: syscall_loop [CALLS >= 1]\n");
        return 2;
    }
    double w0 = ns(CLOCK_MONOTONIC), c0 = ns(CLOCK_THREAD_CPUTIME_ID);
    for (long i = 0; i < n; i++)
        syscall(SYS_getppid);
    double c1 = ns(CLOCK_THREAD_CPUTIME_ID), w1 = ns(CLOCK_MONOTONIC);
    printf("%ld %.1f %.1f\n", n, (w1 - w0) / n, (c1 - c0) / n);
    return 0;
}
