/* Guest for the sandbox tests: mutexes, condition variables, joins, TLS, thread reuse, exit() from a thread. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t c = PTHREAD_COND_INITIALIZER;
static long counter, ready;
static __thread int tls_value;
static void *worker(void *arg) {
    long id = (long)arg;
    tls_value = (int)id;
    for (int i = 0; i < 20000; i++) { pthread_mutex_lock(&m); counter++; pthread_mutex_unlock(&m); }
    pthread_mutex_lock(&m); ready++; pthread_cond_broadcast(&c); pthread_mutex_unlock(&m);
    return (void *)(long)(tls_value * 10);
}
int main(int argc, char **argv) {
    pthread_t t[6];
    for (long i = 0; i < 6; i++) pthread_create(&t[i], 0, worker, (void *)i);
    pthread_mutex_lock(&m); while (ready < 6) pthread_cond_wait(&c, &m); pthread_mutex_unlock(&m);
    long sum = 0;
    for (int i = 0; i < 6; i++) { void *r; pthread_join(t[i], &r); sum += (long)r; }
    printf("counter %ld sum %ld distinct-tid %d\n", counter, sum, (int)(syscall(SYS_gettid) == getpid()));
    for (int round = 0; round < 20; round++) {              /* more threads than stub threads, over time */
        pthread_t x; pthread_create(&x, 0, worker, (void *)1L); pthread_join(x, 0);
    }
    printf("rounds done %ld\n", counter);
    if (argc > 1) { pthread_t x; pthread_create(&x, 0, (void *(*)(void *))exit, (void *)7L); pause(); }
    return 0;
}
