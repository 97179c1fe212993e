// Runs a command and appends its CPU time to a file: "USER_SECONDS SYSTEM_SECONDS" (every thread
// of the command and every child it waited for, from wait4's rusage). Exits with the command's
// status. Usage: cputime FILE COMMAND [ARGS...]
#include <errno.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: cputime FILE COMMAND [ARGS...]\n"); return 2; }
    pid_t child = fork();
    if (child < 0) { perror("cputime: fork"); return 1; }
    if (child == 0) {
        execvp(argv[2], argv + 2);
        perror("cputime: exec");
        _exit(127);
    }
    int status = 0;
    struct rusage usage;
    while (wait4(child, &status, 0, &usage) < 0) {
        if (errno != EINTR) { perror("cputime: wait4"); return 1; }
    }
    FILE *out = fopen(argv[1], "a");
    if (out == NULL) { perror("cputime: fopen"); return 1; }
    fprintf(out, "%ld.%06ld %ld.%06ld\n", (long)usage.ru_utime.tv_sec, (long)usage.ru_utime.tv_usec,
            (long)usage.ru_stime.tv_sec, (long)usage.ru_stime.tv_usec);
    fclose(out);
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}
