#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    char *heap = malloc(1 << 20);
    memset(heap, 7, 1 << 20);
    long sum = 0;
    for (int i = 0; i < (1 << 20); i += 4096) sum += heap[i];
    printf("%d args, first %s, sum %ld, env %s\n", argc, argv[1], sum, getenv("PVM_TEST") ?: "-");
    FILE *f = fopen(argv[2], "r");
    char line[256];
    while (f && fgets(line, sizeof line, f)) fputs(line, stdout);
    return 42;
}
