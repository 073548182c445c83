/* The smallest program: exits 0 (built static, for spawn_loop). */
int main(void) { return 0; }
