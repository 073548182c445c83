/* fork + execve + waitpid of a static program, N times: the cost of making a process.
 * usage: spawn_loop N PROGRAM (PROGRAM is run with no arguments and must exit 0) */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: spawn_loop N PROGRAM\n");
        return 2;
    }
    long n = atol(argv[1]);
    char *child_argv[] = {argv[2], NULL}, *env[] = {NULL};
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            execve(argv[2], child_argv, env);
            _exit(127);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || status != 0) {
            fprintf(stderr, "spawn_loop: child %ld ended with status %#x\n", i, status);
            return 1;
        }
    }
    return 0;
}
