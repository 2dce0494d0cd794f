/*
 * vsock-echo: a small AF_VSOCK client and server for the Linux guest tests (busybox has no
 * vsock tool). Built static by the test (gcc -static) and handed to the guest on a disk.
 *
 *   vsock-echo connect CID PORT TEXT   connect, send TEXT, shut down writing, print the reply
 *                                      as "VSOCK-ECHO got=REPLY"
 *   vsock-echo listen PORT             print "VSOCK-ECHO listening", accept one connection,
 *                                      send back everything it reads until EOF, close
 */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int fail(const char *what)
{
	perror(what);
	printf("VSOCK-ECHO error=%s\n", what);
	return 1;
}

int main(int argc, char **argv)
{
	struct sockaddr_vm a;
	memset(&a, 0, sizeof(a));
	a.svm_family = AF_VSOCK;
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		return fail("socket");
	if (argc == 5 && !strcmp(argv[1], "connect")) {
		a.svm_cid = (unsigned)atoi(argv[2]);
		a.svm_port = (unsigned)atoi(argv[3]);
		if (connect(s, (struct sockaddr *)&a, sizeof(a)))
			return fail("connect");
		size_t n = strlen(argv[4]);
		if (write(s, argv[4], n) != (ssize_t)n)
			return fail("write");
		shutdown(s, SHUT_WR);
		char buf[256];
		size_t got = 0;
		ssize_t k;
		while (got < sizeof(buf) - 1 && (k = read(s, buf + got, sizeof(buf) - 1 - got)) > 0)
			got += (size_t)k;
		buf[got] = 0;
		printf("VSOCK-ECHO got=%s\n", buf);
		return 0;
	}
	if (argc == 3 && !strcmp(argv[1], "listen")) {
		a.svm_cid = VMADDR_CID_ANY;
		a.svm_port = (unsigned)atoi(argv[2]);
		if (bind(s, (struct sockaddr *)&a, sizeof(a)) || listen(s, 1))
			return fail("listen");
		printf("VSOCK-ECHO listening\n");
		fflush(stdout);
		int c = accept(s, NULL, NULL);
		if (c < 0)
			return fail("accept");
		char buf[4096];
		ssize_t k;
		size_t total = 0;
		while ((k = read(c, buf, sizeof(buf))) > 0) {
			if (write(c, buf, (size_t)k) != k)
				return fail("echo");
			total += (size_t)k;
		}
		printf("VSOCK-ECHO echoed=%zu\n", total);
		close(c);
		return 0;
	}
	fprintf(stderr, "usage: vsock-echo connect CID PORT TEXT | listen PORT\n");
	return 2;
}
