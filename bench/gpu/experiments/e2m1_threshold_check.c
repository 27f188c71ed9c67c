/* Exhaustive CPU check behind nvfp4-threshold-codes.patch (bench/gpu/NOTES.md, run 78): for every
 * positive e4m3 scale factor SF and every f32 a from SF / 16 to 16 SF, the number of e2m1
 * rounding boundaries (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 times SF, exact products) that a is
 * past - strictly for the boundaries whose tie goes down to an even code, inclusively for the
 * others - equals e2m1 (nearest, ties to the even code, saturating) of the correctly rounded
 * quotient a / SF. Below SF / 16 both are 0, above 16 SF both saturate.
 * Build and run: gcc -O2 -o chk e2m1_threshold_check.c -lm && ./chk   (8.46e9 checks, ~2 min on
 * one core; prints "checked 8455716990, bad 0" and exits 0 when they agree). */
#include <stdio.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
static float f(uint32_t b){float x; memcpy(&x,&b,4); return x;}
static uint32_t u(float x){uint32_t b; memcpy(&b,&x,4); return b;}
static float e4m3(int c){ int e=(c>>3)&15, m=c&7; return e==0? ldexpf((float)m,-9) : ldexpf(1.0f+m/8.0f, e-7);}
static int e2m1_ref(float a){ /* a >= 0, nearest, ties to even code, saturating */
  static const float mags[8]={0,.5f,1,1.5f,2,3,4,6};
  if (!(a==a)) return 0;
  if (a>=6) return 7;
  int best=0; for(int c=1;c<8;c++){float d=fabsf(a-mags[c]), db=fabsf(a-mags[best]); if(d<db||(d==db&&(c&1)==0)) best=c;} return best;}
int main(){
  long bad=0, total=0;
  for(int c=1;c<127;c++){
    float sf=e4m3(c);
    float t[7]={.25f*sf,.75f*sf,1.25f*sf,1.75f*sf,2.5f*sf,3.5f*sf,5.f*sf};
    /* exactness of products */
    double td[7]={.25*sf,.75*sf,1.25*sf,1.75*sf,2.5*sf,3.5*sf,5.*sf};
    for(int k=0;k<7;k++) if((double)t[k]!=td[k]) {printf("inexact t sf=%g k=%d\n",sf,k); bad++;}
    uint32_t lo=u(sf*0.0625f), hi=u(sf*16.f);
    for(uint32_t b=lo;b<=hi;b++){
      float a=f(b);
      int n=(a>t[0])+(a>=t[1])+(a>t[2])+(a>=t[3])+(a>t[4])+(a>=t[5])+(a>t[6]);
      int r=e2m1_ref(a/sf);
      total++;
      if(n!=r){ if(bad<10) printf("mismatch sf=%g a=%a n=%d r=%d\n",sf,a,n,r); bad++;}
    }
  }
  printf("checked %ld, bad %ld\n",total,bad);
  return bad!=0;
}
