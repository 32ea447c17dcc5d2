/*
 * The sandbox ("pause") process of the local node's pods (e2e/node/, make node-up): the
 * first process of every pod, holding its namespaces while its containers come and go.
 * Written for Tidepool's test node (no registry here to pull a pause image from).
 *
 * It does three things: ends cleanly on SIGINT or SIGTERM (the runtime stopping the pod),
 * reaps any child that ends (it is PID 1 of pods that share their PID namespace), and
 * otherwise sleeps. Built static (no libc in the image): see images.sh.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        puts("tidepool-node pause 1");
        return 0;
    }
    if (getpid() != 1)
        fprintf(stderr, "pause: warning: not PID 1 (pid %d)\n", (int)getpid());

    /* Every signal of interest is taken synchronously: no handler runs concurrently. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0) {
        perror("pause: sigprocmask");
        return 1;
    }
    for (;;) {
        int sig;
        int err = sigwait(&set, &sig);
        if (err != 0) {
            fprintf(stderr, "pause: sigwait: %s\n", strerror(err));
            return 1;
        }
        if (sig == SIGCHLD) {
            while (waitpid(-1, NULL, WNOHANG) > 0) {
            }
            continue;
        }
        /* SIGINT or SIGTERM: the pod is being stopped. */
        return 0;
    }
}
