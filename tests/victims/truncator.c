/* A hostile target: a thread that, without pause, finds any memfd of pvmexec's agent (in its own fd
 * table or through /proc/self/map_files) and truncates it, which would kill a caller that has it
 * mapped with SIGBUS. The main thread waits on stdin. Prints "ready <pid>". */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static volatile long truncated;

static void scan(const char *dir, int reopen)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char path[512], target[512];
    while ((e = readdir(d))) {
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        if (n <= 0)
            continue;
        target[n] = 0;
        if (!strstr(target, "pvmexec-agent"))
            continue;
        int fd = reopen ? open(path, O_RDWR) : atoi(e->d_name);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0 && st.st_size > 0 && ftruncate(fd, 0) == 0)
            truncated++;                       /* it shrank: a caller with it mapped would fault */
        if (reopen && fd >= 0)
            close(fd);
    }
    closedir(d);
}

static void *truncator(void *arg)
{
    for (;;) {
        scan("/proc/self/fd", 0);
        scan("/proc/self/map_files", 1);
    }
    return arg;
}

int main(void)
{
    pthread_t t;
    pthread_create(&t, NULL, truncator, NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    printf("truncated %ld\n", truncated);
    return 0;
}
